"""Smoke tests of the experiment scripts: a tiny configuration runs end to end and writes its files."""

import importlib.util
import json
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lstm_vs_rnn_adding_tiny(tmp_path):
    script = load_script("lstm_vs_rnn_adding")
    out, workdir = tmp_path / "results", tmp_path / "runs"
    result = script.main([
        "--seq-lens", "5", "--hidden", "8", "--steps", "6", "--seeds", "0", "--batch-size", "10",
        "--train-size", "30", "--test-size", "20", "--workdir", str(workdir), "--out", str(out),
    ])
    paths = [out / f"lstm_vs_rnn_adding.{ext}" for ext in ("json", "md", "png")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)

    saved = json.loads(paths[0].read_text())
    assert saved["config"]["seq_lens"] == [5] and saved["config"]["steps"] == 6
    assert {r["model"] for r in saved["runs"]} == {"lstm", "rnn"}
    assert {(r["model"], r["seq_len"]) for r in saved["summary"]} == {("lstm", 5), ("rnn", 5)}
    for run in saved["runs"]:
        assert run["steps"] == 6
        assert run["test_curve"][-1] == [6, run["final_test_mse"]]  # 3 steps per epoch: evals at 3 and 6
        assert len(run["test_curve"]) == 2
        assert run["final_test_mse"] >= 0
        assert (Path(run["workdir"]) / "metrics.jsonl").is_file()
    assert saved["baselines"]["5"]["baseline_mse"] == 1 / 6
    assert saved["environment"]["versions"]["jax"]
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))

    table = paths[1].read_text()
    assert "| 5 | lstm |" in table and "| 5 | rnn |" in table

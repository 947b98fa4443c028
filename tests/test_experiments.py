"""Smoke tests of the experiment scripts: a tiny configuration runs end to end and writes its files."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from _idx import tiny_mnist

from jaxmodels import records

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lstm_vs_rnn_adding_tiny(tmp_path):
    script = load_script("lstm_vs_rnn_adding")
    out, workdir = tmp_path / "results", tmp_path / "runs"
    result = script.main(
        [
            "--seq-lens",
            "5",
            "--models",
            "lstm",
            "rnn",
            "rnn-matched",
            "--hidden",
            "8",
            "--steps",
            "6",
            "--seeds",
            "0",
            "--batch-size",
            "10",
            "--train-size",
            "30",
            "--test-size",
            "20",
            "--workdir",
            str(workdir),
            "--out",
            str(out),
        ]
    )
    paths = [out / f"lstm_vs_rnn_adding.{ext}" for ext in ("json", "md", "png")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)

    saved = json.loads(paths[0].read_text())
    assert saved["config"]["seq_lens"] == [5] and saved["config"]["steps"] == 6
    models = {r["model"]: r for r in saved["summary"]}
    assert set(models) == {"lstm", "rnn", "rnn-matched"} and {
        r["seq_len"] for r in saved["summary"]
    } == {5}
    # the matched RNN: the hidden size whose parameter count is nearest the LSTM's (361 at 8)
    # h(2 + h) + h weights and biases, h + 1 for the head: 17 gives 358, 18 gives 397
    assert models["lstm"]["params"] == 4 * (8 * (2 + 8) + 8) + 8 + 1 == 361
    assert (models["rnn-matched"]["hidden"], models["rnn-matched"]["params"]) == (17, 358)
    for run in saved["runs"]:
        assert run["steps"] == 6
        assert run["test_curve"][-1] == [
            6,
            run["final_test_mse"],
        ]  # 3 steps per epoch: evals at 3 and 6
        assert len(run["test_curve"]) == 2
        assert run["final_test_mse"] >= 0
        assert (Path(run["workdir"]) / "metrics.jsonl").is_file()
    assert saved["baselines"]["5"]["baseline_mse"] == 1 / 6
    assert saved["environment"]["versions"]["jax"]
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))

    table = paths[1].read_text()
    assert "| 5 | lstm | 8 | 361 |" in table and "| 5 | rnn-matched | 17 | 358 |" in table


def _tiny_text(path: Path) -> Path:
    words = [
        "to be",
        "or not",
        "that is",
        "the question",
        "whether",
        "tis nobler",
        "in the mind",
        "to suffer",
    ]
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(120)))
    return path


def test_char_shakespeare_tiny(tmp_path, monkeypatch):
    script = load_script("char_shakespeare")
    text = _tiny_text(tmp_path / "input.txt")
    monkeypatch.setenv("JAXMODELS_TEXT", str(text))  # no --data-file: the environment variable
    out, workdir = tmp_path / "results", tmp_path / "runs"
    result = script.main(
        [
            "--steps",
            "3",
            "5",
            "--seeds",
            "0",
            "--hidden",
            "8",
            "--layers",
            "1",
            "--embed",
            "4",
            "--seq-len",
            "8",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--sample-chars",
            "20",
            "--workdir",
            str(workdir),
            "--out",
            str(out),
        ]
    )
    paths = [out / f"char_shakespeare.{ext}" for ext in ("json", "md", "png")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)

    saved = json.loads(paths[0].read_text())
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert {(r["model"], r["steps"]) for r in saved["runs"]} == {
        (m, s) for m in ("lstm", "rnn") for s in (3, 5)
    }
    vocab = saved["data"]["vocab_size"]
    assert vocab == len(set(text.read_text()))
    assert (
        saved["data"]["validation_windows"] == (saved["data"]["validation_characters"] - 9) // 8 + 1
    )  # adjacent
    for run in saved["runs"]:
        assert run["characters_seen"] == run["steps"] * 4 * 8
        assert 0 < run["val_loss"] < 2 * math.log(vocab)
        assert run["val_bits_per_char"] * math.log(2) == pytest.approx(run["val_loss"])
        assert run["train_curve"][-1][0] == run["characters_seen"]
        assert (Path(run["workdir"]) / "metrics.jsonl").is_file()
    assert [r["mean_val_loss"] for r in saved["summary"]] == [
        next(
            x["val_loss"]
            for x in saved["runs"]
            if (x["model"], x["steps"]) == (r["model"], r["steps"])
        )
        for r in saved["summary"]
    ]
    assert set(saved["samples"]) == {"lstm, 5 steps, seed 0", "rnn, 5 steps, seed 0"}
    for sample in saved["samples"].values():
        assert len(sample) == 20 and set(sample) <= set(text.read_text())
    table = paths[1].read_text()
    assert "| nanoGPT CPU run | 1.88 |" in table and "| 5 | 0.00M | lstm |" in table


def test_char_shakespeare_names_what_is_missing(tmp_path, monkeypatch):
    script = load_script("char_shakespeare")
    monkeypatch.delenv("JAXMODELS_TEXT", raising=False)
    with pytest.raises(FileNotFoundError, match="JAXMODELS_TEXT"):
        script.main(["--steps", "3", "--warmup", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        script.main(["--steps", "50", "--warmup", "100"])
    assert exit_.value.code == 2


def test_cnn_mnist_tiny(tmp_path):
    """Both optimizers on tiny IDX files; PyTorch (where installed) in its own process."""
    script = load_script("cnn_mnist")
    tiny_mnist(tmp_path / "mnist", gz=True, sizes=(128, 16))
    out = tmp_path / "results"
    argv = ["--data-dir", str(tmp_path / "mnist"), "--epochs", "2", "--seeds", "0", "1"]
    result = script.main([*argv, "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads((out / "cnn_mnist.json").read_text())
    assert (out / "cnn_mnist.png").stat().st_size > 0
    assert saved["recipe"] == dict(
        epochs=2, batch_size=64, lr=1e-3, optimizer="rmsprop", schedule="constant"
    )
    jax_runs = [r for r in saved["runs"] if r["framework"] == "jax"]
    assert [(r["optimizer"], r["seed"]) for r in jax_runs] == [
        (o, s) for o in ("rmsprop", "adam") for s in (0, 1)
    ]
    for run in saved["runs"]:
        assert len(run["test_accuracy"]) == len(run["epoch_s"]) == 2
        assert all(0 <= a <= 1 for a in run["test_accuracy"]) and min(run["epoch_s"]) > 0
    torch_runs = [r for r in saved["runs"] if r["framework"] == "torch"]
    assert len(torch_runs) == (1 if records.version("torch") else 0)
    row = saved["summary"][0]
    assert row["mean"] == pytest.approx(np.mean([r["test_accuracy"][-1] for r in jax_runs[:2]]))
    assert "| jax | rmsprop |" in (out / "cnn_mnist.md").read_text()
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))


def test_sequential_mnist_tiny(tmp_path):
    script = load_script("sequential_mnist")
    tiny_mnist(tmp_path / "mnist", gz=True, sizes=(32, 8))
    out = tmp_path / "results"
    argv = ["--data-dir", str(tmp_path / "mnist"), "--tasks", "rows", "permuted", "--epochs", "2"]
    argv += ["--seeds", "0", "--hidden", "8", "--batch-size", "16"]
    script.main([*argv, "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads((out / "sequential_mnist-rows-permuted.json").read_text())
    assert [(r["task"], r["model"], r["seq_len"]) for r in saved["summary"]] == [
        (t, m, n) for t, n in (("rows", 28), ("permuted", 784)) for m in ("lstm", "rnn")
    ]
    for run in saved["runs"]:
        assert len(run["test_accuracy"]) == 2 and 0 <= run["test_accuracy"][-1] <= 1
    commands = [r["command"] for r in saved["summary"]]
    assert "--data-arg permute=0" in commands[2] and "--data-arg steps=pixels" in commands[2]
    assert "--model-arg hidden_size=8" in commands[0] and "--data-arg" not in commands[0]


def test_sequential_mnist_resumes_a_stopped_run_exactly(tmp_path):
    """``--resume``: a run stopped during its second epoch (its last checkpoint gone) and run again
    ends where the uninterrupted run ends, and its per-epoch times come from both sittings."""
    import shutil

    from jaxmodels.training import rundir

    script = load_script("sequential_mnist")
    tiny_mnist(tmp_path / "mnist", gz=True, sizes=(32, 8))
    argv = ["--data-dir", str(tmp_path / "mnist"), "--tasks", "rows", "--models", "lstm"]
    argv += ["--epochs", "2", "--seeds", "0", "--hidden", "8", "--batch-size", "16"]
    argv += ["--workdir", str(tmp_path / "runs"), "--dtype", "bfloat16"]
    whole = script.main([*argv, "--out", str(tmp_path / "whole")])["runs"][0]
    first = script.main([*argv, "--resume", "--out", str(tmp_path / "first")])["runs"][0]
    assert first["test_accuracy"] == whole["test_accuracy"]
    workdir = Path(first["workdir"])
    assert rundir.saved_steps(workdir) == [2, 4]  # an epoch is 32 // 16 = 2 steps
    shutil.rmtree(rundir.checkpoint_dir(workdir) / "4")  # stopped during the second epoch
    again = script.main([*argv, "--resume", "--out", str(tmp_path / "again")])
    run = again["runs"][0]
    assert run["test_accuracy"] == whole["test_accuracy"] and run["test_loss"] == whole["test_loss"]
    # the first epoch's row is the first sitting's (resumed, not trained afresh), the second new
    assert run["epoch_s"][0] == first["epoch_s"][0] and run["epoch_s"][1] != first["epoch_s"][1]
    assert all(t > 0 for t in run["epoch_s"])
    md = (tmp_path / "again" / "sequential_mnist-bfloat16.md").read_text()
    assert "compute in bfloat16" in md and "resumed where a sitting stopped" in md
    assert "--dtype bfloat16" in again["summary"][0]["command"]


def test_cli_seeds_tiny(tmp_path, monkeypatch):
    """The MNIST one-liner as a user runs it, in its own process, on tiny IDX files; its first
    seed twice, bitwise the same."""
    script = load_script("cli_seeds")
    tiny_mnist(tmp_path / "mnist", gz=True, sizes=(128, 16))
    out = tmp_path / "results"
    argv = ["--data-dir", str(tmp_path / "mnist"), "--commands", "cnn-mnist", "--seeds", "0"]
    argv += ["--repeat", "cnn-mnist", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    result = script.main([*argv, "--extra", "--epochs", "2"])
    saved = json.loads((out / "cli_seeds.json").read_text())
    assert (out / "cli_seeds.png").stat().st_size > 0
    (run,) = saved["runs"]
    assert run["recipe"] == dict(
        epochs=2, batch_size=64, lr=1e-3, optimizer="adam", schedule="cosine", warmup_steps=0,
        clip_norm=None,
    )  # fmt: skip
    assert run["steps"] == 4 and len(run["test_accuracy"]) == 2 and run["goal"] == 0.99
    one_liner = ["jaxmodels", "train", "cnn", "--dataset", "mnist", "--data-dir", "DIR"]
    assert run["argv"] == [*one_liner, "--seed", "0"]
    assert saved["repeats"] == {"cnn-mnist": True}
    row = saved["summary"][0]
    assert row["min"] == row["mean"] == row["max"] == run["final_test_accuracy"]
    assert row["every_seed_meets_goal"] == (run["final_test_accuracy"] >= 0.99)
    assert "| cnn-mnist | 0.99 |" in (out / "cli_seeds.md").read_text()
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    monkeypatch.delenv("JAXMODELS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-dir DIR or \\$JAXMODELS_DATA"):
        script.command_line("cnn-mnist", None)
    assert script.command_line("cnn-digits", None) == ["train", "cnn"]
    # The bfloat16 twins: the same one-liners with --dtype bfloat16, the same goals, not by default.
    assert script.command_line("cnn-digits-bf16", None) == ["train", "cnn", "--dtype", "bfloat16"]
    assert script.COMMANDS["cnn-mnist-bf16"][1] == script.COMMANDS["cnn-mnist"][1]
    assert script.parse_args([]).commands == ["cnn-digits", "cnn-mnist"]


def _random_params(key, cell: str, features: int, hidden: int) -> tuple[dict, dict]:
    import jax

    from jaxmodels import init_lstm, init_rnn

    k1, k2 = jax.random.split(key)
    layer = (init_lstm if cell == "lstm" else init_rnn)(k1, features, hidden)
    head = {"kernel": jax.random.normal(k2, (hidden, 1)), "bias": np.ones((1,), np.float32)}
    return layer, head


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_state_gradients_match_the_library_scan_split_at_t(cell):
    """∂ℓ/∂h_t (and ∂ℓ/∂c_t) from the perturbed scan equal jax.grad of the loss of the library's
    own scan (rnn_scan / lstm_scan) over steps t+1..T, started from the state at t."""
    import jax
    import jax.numpy as jnp

    from jaxmodels import lstm_scan, rnn_scan

    script = load_script("adding_gradients")
    batch, steps, features, hidden = 3, 7, 2, 5
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(kx, (batch, steps, features))
    ys = jax.random.normal(ky, (batch,))
    layer, head = _random_params(kp, cell, features, hidden)
    grads, preds = script.state_gradients(cell, layer, head, xs, ys)
    scan = lstm_scan if cell == "lstm" else rnn_scan
    last_h = lambda carry: carry[0] if cell == "lstm" else carry
    predict = lambda carry: (last_h(carry) @ head["kernel"] + head["bias"][None]).reshape(-1)
    full, _ = scan(layer, xs)
    np.testing.assert_allclose(preds, predict(full), rtol=1e-5, atol=1e-6)
    for t in (1, 4, steps - 1):  # the state after step t (1-based), read by steps t+1..T
        carry, _ = scan(layer, xs[:, :t])
        loss = lambda c, t=t: jnp.sum(jnp.square(predict(scan(layer, xs[:, t:], c)[0]) - ys))
        expected = jax.grad(loss)(carry)
        if cell == "lstm":
            np.testing.assert_allclose(grads["h"][:, t - 1], expected[0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(grads["c"][:, t - 1], expected[1], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(grads["h"][:, t - 1], expected, rtol=1e-4, atol=1e-6)
    # at t = T: the loss reads h_T directly, and c_T only through h_T, which is held
    np.testing.assert_allclose(
        grads["h"][:, -1], 2 * (preds - ys)[:, None] * head["kernel"][:, 0][None], rtol=1e-5
    )
    if cell == "lstm":
        assert not np.any(grads["c"][:, -1])


def test_linear_rnn_gradient_decays_as_a_to_the_distance():
    """h_t = x_t W + a h_{t-1}: ∂ℓ/∂h_t = a^(T-t) ∂ℓ/∂h_T, so the norm at distance d is a^d times
    the norm at 0, and the fitted factor per step is a."""
    import jax

    script = load_script("adding_gradients")
    a, steps, hidden = 0.8, 30, 4
    layer, head = _random_params(jax.random.key(1), "rnn", 2, hidden)
    layer = layer | {"w_h": a * np.eye(hidden, dtype=np.float32)}
    xs = jax.random.uniform(jax.random.key(2), (6, steps, 2))
    grads, _ = script.state_gradients("rnn", layer, head, xs, np.zeros(6), activation="identity")
    norms = np.linalg.norm(np.asarray(grads["h"]), axis=-1).mean(axis=0)[::-1]  # by distance
    np.testing.assert_allclose(norms, norms[0] * a ** np.arange(steps), rtol=1e-4)
    fit = script.decay_fit(norms)
    assert fit["factor_per_step"] == pytest.approx(a, rel=1e-4)
    assert fit["fitted_distances"] == [0, steps - 1]
    assert fit["steps_per_tenfold"] == pytest.approx(np.log(10) / -np.log(a), rel=1e-3)
    assert script.decay_fit(np.ones(5))["steps_per_tenfold"] == float("inf")


def test_adding_gradients_tiny(tmp_path):
    script = load_script("adding_gradients")
    out = tmp_path / "results"
    argv = ["--seq-len", "6", "--hidden", "4", "--steps", "4", "--measure-every", "2"]
    argv += ["--batch-size", "5", "--train-size", "20", "--test-size", "8"]
    result = script.main([*argv, "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads((out / "adding_gradients.json").read_text())
    assert (out / "adding_gradients.png").stat().st_size > 0
    assert [(r["model"], r["state"], r["step"]) for r in saved["summary"]] == [
        (m, s, step) for m, states in (("rnn", "h"), ("lstm", "hc")) for step in (0, 2, 4)
        for s in states
    ]  # fmt: skip
    for run in saved["runs"]:
        assert len(run["norms"]) == 6 and run["test_mse"] >= 0
        assert run["factor_per_step"] > 0 and run["fitted_distances"][1] == 5
    first = {(r["model"], r["state"]): r for r in saved["runs"] if r["step"] == 0}
    assert first["lstm", "c"]["norms"][0] == 0 and first["lstm", "c"]["fitted_distances"][0] == 1
    assert "| lstm | ∂L/∂c_t | 4 |" in (out / "adding_gradients.md").read_text()
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    with pytest.raises(SystemExit):
        script.main(["--steps", "5", "--measure-every", "2"])

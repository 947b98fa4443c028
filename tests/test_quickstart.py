"""The README's first quick-start command, `jaxmodels train cnn`, with its defaults: the seed CNN on
the bundled digits reaches the test accuracy the README quotes (at least 0.97)."""

import json

from jaxmodels.cli import main


def test_default_cnn_run_reaches_the_quoted_accuracy(tmp_path, capsys):
    workdir = tmp_path / "cnn-digits"
    assert main(["train", "cnn", "--workdir", str(workdir), "--no-progress"]) == 0
    assert "cnn on digits: test accuracy" in capsys.readouterr().out
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert final["step"] == 1100  # 25 epochs of 44 batches of 32, as the README says
    assert final["accuracy"] >= 0.97, final

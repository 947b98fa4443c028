"""The ``jaxmodels`` command: train end to end (the CNN, the character models on text and on the
copy task), a run's folder (refused when used, --overwrite, --resume of another run), eval from
the run's config.json, metrics on disk before they are shown, and every option of every command
with a bad value: one line on stderr (or argparse's usage error), never a traceback."""

import json
import re
import shutil

import jax
import pytest
from _idx import tiny_mnist

from jaxmodels import commands, inputs
from jaxmodels.cli import main
from jaxmodels.data.datasets import DATASET_KINDS, get_dataset, list_datasets
from jaxmodels.nn.models import get_model, list_models, model_kind
from jaxmodels.training import rundir

QUICK = ["--epochs", "1", "--batch-size", "16", "--no-progress"]


def _one_error_line(err: str) -> str:
    """The single ``jaxmodels: error: ...`` line of ``err``; fails on anything else."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxmodels: error: "), err
    return lines[0]


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "cnn", "--max-steps", "6", "--log-every", "3", "--lr", "2e-3"]
    argv += ["--optimizer", "adamw", "--seed", "1", "--workdir", str(workdir), *QUICK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cnn on digits: test accuracy" in out
    assert "epoch 1/1  step 6/6  test" in out  # the steps the run does, not the epochs it would
    written = "config.json, metrics.jsonl, test_metrics.json, learning_curves.png, checkpoints/"
    assert f"wrote {workdir}/{written}" in out
    rows = _rows(workdir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6] and rows[-1][
        "kind"
    ] == "eval"
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["optimizer"] == "adamw" and config["train"]["seed"] == 1
    assert config["dataset_options"] == {"test_size": 360, "seed": 0, "size": 20, "canvas": 28}
    final = json.loads((workdir / "test_metrics.json").read_text())
    assert final == {"step": 6, "test": {k: rows[-1][k] for k in ("loss", "accuracy")}}
    assert (workdir / "learning_curves.png").stat().st_size > 1000


def test_only_process_zero_prints_and_writes(tmp_path, capsys, monkeypatch):
    """In a multi-process run the other processes train silently: no progress, epoch or summary
    lines and no files (process 0 writes them)."""
    monkeypatch.setattr(jax, "process_index", lambda *a: 1)
    argv = ["train", "cnn", "--epochs", "1", "--max-steps", "2", "--batch-size", "16"]
    assert main([*argv, "--workdir", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax " in out and "flax" in out and "optax" in out and "backend" in out and "cpu" in out


# ---------------------------------------------------------------------- models and their data


def test_model_kinds_match_the_registries():
    """What the registry says each model reads against the models themselves: each is built for
    its task and initialised on an input of its kind; each data set kind matches the data."""
    assert set(DATASET_KINDS) == set(list_datasets())
    examples = {
        "images": jax.ShapeDtypeStruct((1, 28, 28, 1), "float32"),
        "sequences": jax.ShapeDtypeStruct((1, 5, 2), "float32"),
        "tokens": jax.ShapeDtypeStruct((1, 5), "int32"),
    }
    for name in list_models():
        task, inputs = model_kind(name)
        model = get_model(name, vocab_size=7) if task == "language_model" else get_model(name)
        assert model.task == task, name
        jax.eval_shape(model.init, jax.random.key(0), examples[inputs])
    ranks = {"images": 3, "sequences": 2, "tokens": 1}
    for name, options in [
        ("digits", {}),
        ("seq-digits", {}),
        ("adding", {"seq_len": 4, "train_size": 2, "test_size": 1}),
        ("copy", {"seq_len": 4, "train_size": 2, "test_size": 1}),
    ]:
        ds = get_dataset(name, **options)
        task, inputs = DATASET_KINDS[name]
        assert ds.task == task and len(ds.input_shape) == ranks[inputs], name


def test_char_models_train_from_the_command_line(tmp_path, capsys):
    """char-lstm and char-rnn on a text file and char-lstm on the copy task (the vocabulary comes
    from the data; the models were once built without it and could not be trained at all)."""
    text = tmp_path / "input.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    steps = ["--max-steps", "2", "--batch-size", "4", "--no-progress"]
    for model, data in [
        ("char-lstm", ["--dataset", "text", "--data-file", str(text), "--seq-len", "8"]),
        ("char-rnn", ["--dataset", "text", "--data-file", str(text), "--seq-len", "8"]),
        ("char-lstm", ["--dataset", "copy", "--seq-len", "4"]),
    ]:
        workdir = tmp_path / f"{model}-{data[1]}"
        assert main(["train", model, *data, *steps, "--workdir", str(workdir)]) == 0
        assert f"{model} on {data[1]}: test accuracy" in capsys.readouterr().out
        assert _rows(workdir)[-1]["kind"] == "eval"


def test_model_args_set_the_model_and_eval_rebuilds_it(tmp_path, capsys):
    """--model-arg sets any option of the registry model, recorded in config.json, from which
    eval rebuilds the same model (a checkpoint of hidden 16 would not restore into the default)."""
    workdir = tmp_path / "run"
    argv = ["train", "lstm-classifier", "--dataset", "seq-digits", "--workdir", str(workdir)]
    argv += ["--model-arg", "hidden_size=16", "--model-arg", "num_layers=2", "--model-arg"]
    argv += ["bidirectional=true", "--model-arg", "dropout_rate=0", "--max-steps", "2", *QUICK]
    assert main(argv) == 0
    recorded = rundir.load_run_settings(workdir).model_options
    assert recorded == dict(
        hidden_size=16, num_layers=2, bidirectional=True, dropout_rate=0.0, impl="auto"
    )
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2

    cnn = ["train", "cnn", "--workdir", str(tmp_path / "cnn"), "--max-steps", "1", *QUICK]
    assert main([*cnn, "--model-arg", "features=[8,16,16]", "--model-arg", "padding=SAME"]) == 0
    options = rundir.load_run_settings(tmp_path / "cnn").model_options
    assert options["features"] == (8, 16, 16) and options["padding"] == "SAME"


def test_a_bad_model_arg_names_the_options(tmp_path, capsys):
    argv = ["train", "lstm-classifier", "--dataset", "seq-digits", *QUICK]
    assert main([*argv, "--workdir", str(tmp_path / "a"), "--model-arg", "hiden_size=8"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "lstm-classifier has no option 'hiden_size'" in line
    assert "hidden_size (default 128), num_layers (default 1)" in line
    assert main([*argv, "--workdir", str(tmp_path / "b"), "--model-arg", "hidden_size=1.5"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.endswith("--model-arg hidden_size=1.5: expected an integer (default 128)")
    assert main([*argv, "--workdir", str(tmp_path / "c"), "--model-arg", "hidden_size=0"]) == 1
    assert "expected hidden_size to be an integer >= 1, got 0" in _one_error_line(
        capsys.readouterr().err
    )


def test_data_args_set_the_data_set_and_eval_reads_them(tmp_path, capsys):
    """--data-arg sets any option of the data set (pixel-by-pixel, permuted), recorded in
    config.json, from which eval loads the same sequences."""
    workdir = tmp_path / "run"
    argv = ["train", "rnn-classifier", "--dataset", "seq-digits", "--workdir", str(workdir)]
    argv += ["--data-arg", "steps=pixels", "--data-arg", "permute=3", "--model-arg"]
    argv += ["hidden_size=8", "--max-steps", "1", *QUICK]
    assert main(argv) == 0
    options = rundir.load_run_settings(workdir).dataset_options
    assert options["steps"] == "pixels" and options["permute"] == 3
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1


def test_cnn_on_mnist_takes_its_recipe_and_flags_override_it(tmp_path, capsys):
    """The seed CNN on MNIST trains with its recipe (Adam, cosine decay, batch 64, 5 epochs)
    unless a flag says otherwise; on digits, with TrainConfig's defaults."""
    tiny_mnist(tmp_path / "mnist", gz=True, sizes=(64, 3))
    argv = ["train", "cnn", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist")]
    argv += ["--max-steps", "1", "--no-progress"]
    keys = ("epochs", "batch_size", "optimizer", "schedule", "lr")
    for name, flags, expected in [
        ("recipe", [], (5, 64, "adam", "cosine", 1e-3)),
        (
            "mine",
            ["--optimizer", "rmsprop", "--schedule", "constant", "--batch-size", "32"],
            (5, 32, "rmsprop", "constant", 1e-3),
        ),
    ]:
        assert main([*argv, *flags, "--workdir", str(tmp_path / name)]) == 0
        train = json.loads((tmp_path / name / "config.json").read_text())["train"]
        assert tuple(train[k] for k in keys) == expected
    digits = ["train", "cnn", "--max-steps", "1", "--no-progress", "--workdir", str(tmp_path / "d")]
    assert main(digits) == 0
    train = json.loads((tmp_path / "d" / "config.json").read_text())["train"]
    assert tuple(train[k] for k in keys) == (25, 32, "adam", "cosine", 1e-3)


@pytest.mark.parametrize("model", ["cnn", "char-lstm"])
def test_export_writes_an_artifact_that_jax_alone_runs_at_any_batch(model, tmp_path, capsys):
    """jaxmodels export: the trained model's apply, parameters inside, symbolic batch (and time
    for a character model), for cpu, cuda and tpu; its outputs are the model's at two sizes."""
    import numpy as np

    from jaxmodels.training.evaluate import restore_params

    workdir, out = tmp_path / "run", tmp_path / "model.jax"
    data = []
    if model == "char-lstm":
        text = tmp_path / "input.txt"
        text.write_text("to be or not to be, that is the question.\n" * 20, encoding="utf-8")
        data = ["--dataset", "text", "--data-file", str(text), "--seq-len", "8"]
        data += ["--model-arg", "hidden_size=16"]
    argv = ["train", model, *data, "--workdir", str(workdir), "--max-steps", "2", *QUICK]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    exported = jax.export.deserialize(out.read_bytes())
    assert exported.platforms == ("cpu", "cuda", "tpu")
    settings = rundir.load_run_settings(workdir)
    net, ds = inputs.load(
        model, settings.dataset, settings.dataset_options, "float32", (), settings.model_options
    )
    _, state = restore_params(net, ds.x_test[:1], workdir)
    for batch, time in ((1, None), (5, 13)):
        x = ds.x_test[:batch]
        if time is not None and model == "char-lstm":
            x = np.resize(ds.x_test[:batch], (batch, time))  # another time length
        ours = net.apply({"params": state.params}, x)
        np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(ours), atol=1e-6)


def test_safetensors_weights_out_of_a_run_and_into_eval_and_export(tmp_path, capsys):
    """export --out FILE.safetensors writes a run's variables and config; eval and export take
    them with --weights: the same test metrics as the run's checkpoint, the same artifact."""
    workdir, weights = tmp_path / "run", tmp_path / "lstm.safetensors"
    data = ["--dataset", "seq-digits"]
    argv = ["train", "lstm-classifier", *data, "--workdir", str(workdir), "--max-steps", "2"]
    assert main([*argv, "--model-arg", "hidden_size=16", *QUICK]) == 0
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["export", "--workdir", str(workdir), "--out", str(weights)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {weights}: lstm-classifier step 2")
    assert main(["eval", "--weights", str(weights), *data]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["test"] == from_run["test"] and from_file["weights"] == str(weights)
    artifact = tmp_path / "lstm.jax"
    assert main(["export", "--weights", str(weights), *data, "--out", str(artifact)]) == 0
    assert (
        jax.export.deserialize(artifact.read_bytes()).in_avals[0].str_short() == "float32[b,t,28]"
    )
    assert main(["eval", "--weights", str(weights)]) == 1  # a sequence model: which data set?
    assert "give the data set with --dataset" in _one_error_line(capsys.readouterr().err)


def test_sample_prints_text_from_a_character_model(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text("ROMEO: the quick brown fox jumps over the lazy dog.\n" * 20, encoding="utf-8")
    workdir = tmp_path / "run"
    data = ["--dataset", "text", "--data-file", str(text), "--seq-len", "8"]
    train = ["train", "char-lstm", *data, "--max-steps", "3", "--batch-size", "4", "--no-progress"]
    assert main([*train, "--workdir", str(workdir), "--model-arg", "hidden_size=32"]) == 0
    capsys.readouterr()
    sample = ["sample", "--workdir", str(workdir), "--prompt", "ROMEO:", "--length", "40"]
    assert main([*sample, "--temperature", "0"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 40
    assert set(out) <= set(text.read_text())
    assert main([*sample, "--temperature", "0"]) == 0  # the most likely characters: the same
    assert capsys.readouterr().out.rstrip("\n") == out
    assert main([*sample, "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")

    assert main(["sample", "--workdir", str(workdir), "--prompt", "ROMEO: ~"]) == 1
    assert "not in the vocabulary" in _one_error_line(capsys.readouterr().err)
    cnn = tmp_path / "cnn"
    assert main(["train", "cnn", "--workdir", str(cnn), "--max-steps", "1", *QUICK]) == 0
    capsys.readouterr()
    assert main(["sample", "--workdir", str(cnn)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "sample needs a character model (char-lstm, char-rnn)" in line


# ------------------------------------------------------------------------------ a run's folder


def _used(workdir, model="cnn", dataset="digits"):
    """A folder as a run leaves it: config.json and a checkpoint folder."""
    (workdir / "checkpoints" / "50").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"model": model, "dataset": dataset}))
    return workdir


def test_a_fresh_run_refuses_a_used_workdir_and_overwrite_moves_it_aside(tmp_path, capsys):
    used = _used(tmp_path / "run")
    assert main(["train", "cnn", "--workdir", str(used), "--max-steps", "2", *QUICK]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a run (config.json, checkpoints up to step 50)" in line
    assert "--resume" in line and "--overwrite" in line

    argv = ["train", "cnn", "--workdir", str(used), "--max-steps", "2", "--overwrite", *QUICK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the run that was in {used} to {aside}" in out
    assert (aside / "checkpoints" / "50").is_dir()  # the old run, whole
    assert rundir.saved_steps(used) == [2]  # the new run alone: eval and --resume see only it


def test_resume_refuses_a_run_of_another_model_or_data_set(tmp_path, capsys):
    used = _used(tmp_path / "run", "lstm-classifier", "seq-digits")
    assert main(["train", "cnn", "--workdir", str(used), "--resume", *QUICK]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "holds a run of lstm-classifier on seq-digits, not cnn on digits" in line
    assert rundir.saved_steps(used) == [50]  # untouched


def test_unwritable_workdirs_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """A file, a folder under a file, and a read-only folder (the refusal simulated where files are
    created: root ignores permissions); eval stops before it evaluates, not when writing."""
    (tmp_path / "file").write_text("")
    for workdir, fragment in [
        (tmp_path / "file", "work folder " + str(tmp_path / "file") + " is a file, not a folder"),
        (tmp_path / "file" / "sub", "cannot create the work folder"),
    ]:
        assert main(["train", "cnn", "--workdir", str(workdir), *QUICK]) == 1
        assert fragment in _one_error_line(capsys.readouterr().err)

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open = rundir.os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", refuse)
    assert main(["train", "cnn", "--workdir", str(read_only), *QUICK]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write in the work folder {read_only}: Permission denied" in line

    _used(read_only)
    monkeypatch.setattr(
        "jaxmodels.training.evaluate.evaluate_checkpoint", pytest.fail
    )  # never reached
    assert main(["eval", "--workdir", str(read_only)]) == 1
    assert "cannot write in the output folder" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------- eval


def test_eval_reads_the_run_from_its_config(tmp_path, capsys, monkeypatch):
    text = tmp_path / "input.txt"
    text.write_text("abcdefgh " * 60, encoding="utf-8")
    workdir = tmp_path / "run"
    data = ["--dataset", "text", "--data-file", str(text), "--seq-len", "8"]
    train = ["train", "char-rnn", *data, "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    assert main([*train, "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    settings = rundir.load_run_settings(workdir)
    assert (settings.model, settings.dataset, settings.dtype) == ("char-rnn", "text", "float32")
    assert (
        settings.dataset_options["path"] == str(text) and settings.dataset_options["seq_len"] == 8
    )

    shown = []
    monkeypatch.setattr(  # what is printed is on disk first
        commands, "print", lambda t: shown.append((t, (workdir / "eval.json").read_text())), False
    )
    assert main(["eval", "--workdir", str(workdir)]) == 0  # no MODEL, no data options
    printed, on_disk = shown[-1]
    result = json.loads(printed)
    assert result["model"] == "char-rnn" and result["dataset"] == "text" and result["step"] == 2
    assert on_disk == printed + "\n"
    monkeypatch.undo()

    for argv, fragment in [
        (["char-lstm"], "MODEL char-lstm contradicts the run in"),
        (["--dataset", "copy"], "--dataset copy contradicts the run in"),
        (["--seq-len", "9"], "--seq-len 9 contradicts the run in"),
        (["--dtype", "bfloat16"], "--dtype bfloat16 contradicts the run in"),
    ]:
        assert main(["eval", *argv, "--workdir", str(workdir)]) == 1
        assert fragment in _one_error_line(capsys.readouterr().err)

    moved = tmp_path / "moved.txt"  # the data moved: its new place may be given
    shutil.move(text, moved)
    assert main(["eval", "char-rnn", "--workdir", str(workdir), "--data-file", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == result["test"]


def test_metrics_are_on_disk_before_they_are_shown(tmp_path, monkeypatch):
    """Each epoch line and the final summary are printed only once their numbers are in the run's
    files (metrics.jsonl, test_metrics.json)."""
    import rich.console

    workdir, seen = tmp_path / "run", []
    real = rich.console.Console.print

    def console_print(self, text, *args, **kwargs):
        seen.append((text, [r["step"] for r in _rows(workdir) if r["kind"] == "eval"]))
        return real(self, text, *args, **kwargs)

    def summary_print(text):
        seen.append((text, (workdir / "test_metrics.json").is_file()))

    monkeypatch.setattr(rich.console.Console, "print", console_print)
    monkeypatch.setattr(commands, "print", summary_print, False)
    argv = ["train", "cnn", "--epochs", "3", "--max-steps", "7", "--workdir", str(workdir)]
    assert main([*argv, "--batch-size", "256", "--no-progress"]) == 0  # 5 steps an epoch
    assert seen[0][0].startswith("epoch 1/2  step 5/7  test") and seen[0][1] == [5]
    assert seen[1][0].startswith("epoch 2/2  step 7/7  test") and seen[1][1] == [5, 7]
    assert seen[2][0].startswith("cnn on digits: test") and seen[2][1] is True


# ----------------------------------------------------------------------- every option, bad values

# {file}: an existing file; {used}: a folder holding a run; {tmp}: a fresh folder.
BAD = [
    # train: MODEL and the data options
    ["train"],
    ["train", "resnet"],
    ["train", "cnn", "--dataset", "cifar"],
    ["train", "lstm-classifier"],  # digits are images
    ["train", "cnn", "--dataset", "adding"],
    ["train", "char-lstm"],  # digits again: the vocabulary is not the question
    ["train", "cnn", "--data-dir", "{tmp}"],  # digits take no data folder
    ["train", "cnn", "--dataset", "mnist", "--data-dir", "{tmp}/absent"],
    ["train", "cnn", "--dataset", "mnist", "--data-dir", "{file}"],
    ["train", "cnn", "--dataset", "mnist", "--data-dir", "{tmp}"],  # no MNIST files
    ["train", "cnn", "--download"],
    ["train", "char-lstm", "--dataset", "text", "--data-file", "{tmp}/absent.txt"],
    ["train", "char-lstm", "--dataset", "text", "--data-file", "{tmp}"],
    ["train", "char-lstm", "--dataset", "text"],  # no file at all
    ["train", "cnn", "--data-file", "{file}"],
    ["train", "cnn", "--seq-len", "5"],
    *[["train", "char-lstm", "--dataset", "copy", "--seq-len", v] for v in ("0", "-1", "x")],
    ["train", "cnn", "--dtype", "float16"],
    ["train", "cnn", "--model-arg", "hidden_size=8"],  # the CNN has no hidden size
    ["train", "cnn", "--model-arg", "padding"],  # no value
    ["train", "cnn", "--model-arg", "=3"],
    ["train", "cnn", "--model-arg", "features=32"],  # a list expected
    ["train", "cnn", "--model-arg", "num_classes=3"],  # the data's to set
    ["train", "lstm-classifier", "--dataset", "seq-digits", "--model-arg", "hidden_size=x"],
    ["train", "lstm-classifier", "--dataset", "seq-digits", "--model-arg", "bidirectional=1"],
    *[
        ["train", "lstm-classifier", "--dataset", "seq-digits", "--data-arg", pair]
        for pair in ("steps=diagonal", "stepz=rows", "permute=x", "permute=-1", "test_size=x")
    ],
    ["train", "cnn", "--dataset", "mnist", "--data-arg", "data_dir={tmp}"],  # --data-dir's
    ["train", "rnn-regressor", "--dataset", "adding", "--data-arg", "train_size=0"],
    # train: the numbers
    *[["train", "cnn", flag, v] for flag in ("--epochs", "--batch-size") for v in ("0", "-2", "x")],
    *[
        ["train", "cnn", flag, v]
        for flag in ("--lr", "--clip-norm")
        for v in ("0", "-1", "x", "nan")
    ],
    *[["train", "cnn", "--weight-decay", v] for v in ("-0.1", "x", "inf")],
    *[["train", "cnn", flag, v] for flag in ("--seed", "--warmup-steps") for v in ("-1", "1.5")],
    *[["train", "cnn", flag, "0"] for flag in ("--max-steps", "--log-every", "--checkpoint-every")],
    ["train", "cnn", "--keep", "0"],
    ["train", "cnn", "--batch-size", "5000"],
    ["train", "cnn", "--optimizer", "adamax"],
    ["train", "cnn", "--schedule", "step"],
    ["train", "cnn", "--strategy", "fsdp"],
    # train: the work folder
    ["train", "cnn", "--workdir", "{file}"],
    ["train", "cnn", "--workdir", "{file}/sub"],
    ["train", "cnn", "--workdir", "{used}"],
    ["train", "lstm-classifier", "--dataset", "seq-digits", "--workdir", "{used}", "--resume"],
    ["train", "cnn", "--workdir", "{used}", "--resume", "--overwrite"],
    # train: multi-host
    ["train", "cnn", "--num-processes", "2"],
    ["train", "cnn", "--coordinator-address", "127.0.0.1:1234"],
    ["train", "cnn", "--coordinator-address", "nohost"],
    ["train", "cnn", "--coordinator-address", "h:99999"],
    ["train", "cnn", "--num-processes", "0"],
    ["train", "cnn", "--process-id", "-1"],
    ["train", "cnn", "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
    # export
    ["export", "--workdir", "{used}"],  # no --out
    ["export", "--workdir", "{tmp}/absent", "--out", "{tmp}/m.jax"],
    ["export", "--workdir", "{used}", "--out", "{tmp}"],
    ["export", "--workdir", "{used}", "--out", "{file}/m.jax"],
    ["export", "--workdir", "{used}", "--out", "{tmp}/m.jax", "--platforms", "gpu"],
    ["export", "--workdir", "{used}", "--out", "{tmp}/m.jax", "--step", "999"],
    ["export", "--weights", "{file}", "--out", "{tmp}/m.jax"],  # not a safetensors file
    ["export", "--weights", "{tmp}/absent.safetensors", "--out", "{tmp}/m.jax"],
    # eval
    ["eval", "--weights", "{file}"],
    ["eval", "--weights", "{tmp}/absent.safetensors"],
    ["eval", "--weights", "{file}", "--workdir", "{used}"],
    ["sample"],
    ["sample", "--workdir", "{tmp}/absent"],
    ["sample", "--workdir", "{used}"],  # a cnn run
    ["sample", "char-lstm", "--workdir", "{tmp}"],  # no checkpoint there
    ["sample", "--workdir", "{used}", "--length", "0"],
    ["sample", "--workdir", "{used}", "--temperature", "-1"],
    ["eval"],
    ["eval", "resnet"],
    ["eval", "--workdir", "{tmp}/absent"],
    ["eval", "--workdir", "{file}"],
    ["eval", "--workdir", "{tmp}"],  # a folder without config.json or checkpoints
    ["eval", "cnn", "--workdir", "{tmp}"],  # MODEL given: no checkpoint there
    ["eval", "--workdir", "{used}", "--dataset", "mnist"],
    ["eval", "lstm-classifier", "--workdir", "{used}"],
    ["eval", "--workdir", "{used}", "--dtype", "bfloat16"],
    ["eval", "--workdir", "{used}", "--data-file", "{file}"],
    ["eval", "--workdir", "{used}", "--output", "{tmp}"],
    ["eval", "--workdir", "{used}", "--output", "{file}/eval.json"],
    *[["eval", "cnn", flag, v] for flag in ("--step", "--batch-size") for v in ("0", "x")],
    ["eval", "cnn", "--dataset", "cifar"],
    # bench and info
    ["bench"],
    ["bench", "gru"],
    *[["bench", "lstm", flag, v] for flag in ("--repeats", "--torch-threads") for v in ("0", "x")],
    ["bench", "lstm", "--shapes", "huge"],
    ["bench", "lstm", "--isolation", "thread"],
    ["bench", "lstm", "--out", "{file}"],
    ["info", "extra"],
    ["nothing"],
    [],
]
USAGE = re.compile(r"^jaxmodels( \w+)?: error: ")


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) or "(none)" for a in BAD])
def test_every_bad_option_is_one_line_and_no_traceback(argv, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    used = _used(tmp_path / "used")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    argv = [a.format(file=tmp_path / "file", used=used, tmp=fresh) for a in argv]
    monkeypatch.chdir(tmp_path)  # default work folders (runs/MODEL-DATASET) land here
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JAXMODELS_TEXT", raising=False)
    monkeypatch.setattr(
        "jaxmodels.training.fit.fit", pytest.fail
    )  # an error comes before any training
    monkeypatch.setattr("jaxmodels.training.evaluate.evaluate_checkpoint", pytest.fail)
    monkeypatch.setattr("jaxmodels.bench.run", pytest.fail)
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse: usage lines, then one error line
        status = exit_info.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and USAGE.match(lines[-1]), lines
        assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), lines
    else:
        assert status == 1
        _one_error_line(capsys.readouterr().err)
    assert "Traceback" not in capsys.readouterr().err

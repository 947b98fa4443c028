"""Every file the CLI writes for a user appears whole or not at all (``jaxmodels.files``): each
output's write is interrupted half way (KeyboardInterrupt, a full disk) and the file already at
the target stays as it was, no temporary file is left, and the error goes on (the CLI's: one line).
"""

import builtins
import errno
import io
import json
from pathlib import Path

import numpy as np
import pytest

from jaxmodels import files
from jaxmodels.cli import main

OLD = b"the old, good content\n"
QUICK = ["--epochs", "1", "--batch-size", "16", "--no-progress"]


def _full_disk(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


# What interrupts a write: a factory of the exception, given the file being written.
INTERRUPTS = {
    "KeyboardInterrupt": lambda path: KeyboardInterrupt(),
    "disk full": _full_disk,
}


@pytest.fixture(params=sorted(INTERRUPTS))
def interrupt(request):
    return INTERRUPTS[request.param]


def _old_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(OLD)
    return folder / name


def _assert_untouched(target: Path) -> None:
    """The target holds its old content and nothing else is in its folder but other old files."""
    assert target.read_bytes() == OLD
    left = [p.name for p in target.parent.iterdir() if files.PART in p.name]
    assert not left, f"temporary files left behind: {left}"


class _HalfWriter:
    """A file whose write writes half of the bytes (flushed, on disk) and then raises."""

    def __init__(self, file, error: BaseException):
        self.file, self.error = file, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise self.error


def _interrupt_writes(monkeypatch, interrupt) -> None:
    """The atomic module's own writes (``write_atomic``) stop half way with ``interrupt``."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _HalfWriter(handle, interrupt(file)) if any(m in mode for m in "wax") else handle

    monkeypatch.setattr(files, "open", open_, raising=False)


def _interrupt_savefig(monkeypatch, interrupt) -> list:
    """matplotlib's Figure.savefig writes half of its image and then raises; returns the calls
    (path, format) it saw."""
    from matplotlib.figure import Figure

    real_savefig, calls = Figure.savefig, []

    def savefig(self, fname, *args, **kwargs):
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, **kwargs)
        data = buffer.getvalue()
        Path(fname).write_bytes(data[: len(data) // 2])
        calls.append((Path(fname), kwargs.get("format")))
        raise interrupt(fname)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return calls


def _raises(interrupt):
    return pytest.raises(type(interrupt("x")))


# ------------------------------------------------------------------------------------ the helper


@pytest.mark.parametrize("data", [b"\x00\x01bytes\xff", "text, ünïcode\n"])
def test_write_atomic_replaces_the_file(tmp_path, data):
    target = _old_file(tmp_path, "out.bin")
    files.write_atomic(target, data)
    expected = data.encode("utf-8") if isinstance(data, str) else data
    assert target.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    files.write_atomic(tmp_path / "new.txt", "fresh")  # no old file
    assert (tmp_path / "new.txt").read_text() == "fresh"


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch, interrupt):
    target = _old_file(tmp_path, "out.bin")
    _interrupt_writes(monkeypatch, interrupt)
    with _raises(interrupt) as raised:
        files.write_atomic(target, b"new content " * 1000)
    _assert_untouched(target)
    if isinstance(raised.value, OSError):  # it names the user's file, not the temporary one
        assert raised.value.filename == str(target)
        assert str(target) in str(raised.value)


def test_a_failed_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    target = _old_file(tmp_path, "out.bin")

    def replace(src, dst):
        raise _full_disk(src)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(target, b"new")
    _assert_untouched(target)


def test_save_figure_writes_in_the_format_of_the_suffix(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [1, 0])
    files.save_figure(fig, tmp_path / "a.png", dpi=20)
    files.save_figure(fig, tmp_path / "a.svg")
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "a.svg").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.svg"]


# ----------------------------------------------------------------------------------- the outputs


def test_run_folder_text_files(tmp_path, monkeypatch, interrupt):
    """config.json (and metrics.jsonl, test_metrics.json, eval.json: ``files.write_atomic``)."""
    from jaxmodels.training import rundir

    target = _old_file(tmp_path, rundir.CONFIG_FILE)
    _interrupt_writes(monkeypatch, interrupt)
    with _raises(interrupt):
        rundir.write_config(tmp_path, {"model": "cnn", "big": list(range(1000))})
    _assert_untouched(target)


def test_learning_curves(tmp_path, monkeypatch, interrupt):
    from jaxmodels.training import rundir, runlog

    writer = runlog.RunWriter(tmp_path)
    for step in (1, 2):
        writer.log({"kind": "train", "step": step, "loss": 1.0 / step})
    target = _old_file(tmp_path, rundir.CURVES_FILE)
    calls = _interrupt_savefig(monkeypatch, interrupt)
    with _raises(interrupt):
        writer.plot()
    _assert_untouched(target)
    assert calls and calls[0][0].parent == tmp_path and calls[0][1] == "png"


def test_results_json_and_markdown(tmp_path, monkeypatch, interrupt):
    from jaxmodels.records import write_results

    json_file, md_file = _old_file(tmp_path, "r.json"), _old_file(tmp_path, "r.md")
    _interrupt_writes(monkeypatch, interrupt)
    with _raises(interrupt):
        write_results({"a": list(range(100))}, tmp_path, "r", render_markdown=lambda r: "# r\n")
    _assert_untouched(json_file)
    _assert_untouched(md_file)
    monkeypatch.undo()
    paths = write_results({"a": 1}, tmp_path, "r", render_markdown=lambda r: "# r\n")
    assert json.loads(paths[0].read_text()) == {"a": 1} and md_file.read_text() == "# r\n"


def test_experiment_plot(tmp_path, monkeypatch, interrupt):
    from jaxmodels.report import Curves

    curves = Curves(
        curve=lambda run: ([0, 1], [1.0, run["seed"]]),
        color_by="seed",
        colors={0: "C0", 1: "C1"},
        label="seed {seed}",
        xlabel="x",
        ylabel="y",
        title="{panel}",
        size=(2.0, 2.0),
    )
    target = _old_file(tmp_path, "study.png")
    calls = _interrupt_savefig(monkeypatch, interrupt)
    with _raises(interrupt):
        curves.draw({"runs": [{"seed": 0}, {"seed": 1}]}, target)
    _assert_untouched(target)
    assert calls and calls[0][1] == "png"


def test_benchmark_plot(tmp_path, monkeypatch, interrupt):
    from jaxmodels.bench.report import plot

    contender = {"name": "jax", "median_s": 1.0, "speedup": {"jax": 1.0}}
    result = {
        "suite": "tiny",
        "baseline": "jax",
        "workloads": [{"group": "g", "name": "w", "contenders": [contender]}],
        "environment": {
            "date": "today",
            "backend": "cpu",
            "cpu_count": 2,
            "versions": {"jax": "0", "torch": "0"},
        },
        "peak": {"gflops": 1.0},
    }
    target = _old_file(tmp_path, "bench.png")
    calls = _interrupt_savefig(monkeypatch, interrupt)
    with _raises(interrupt):
        plot(result, target)
    _assert_untouched(target)
    assert calls and calls[0][1] == "png"


def test_safetensors(tmp_path, monkeypatch, interrupt):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from jaxmodels.interop.safetensors import load_variables, save_variables

    real_save_file = safetensors_numpy.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise interrupt(filename)

    variables = {"params": {"w": np.arange(1000, dtype=np.float32)}}
    target = _old_file(tmp_path, "cnn.safetensors")
    monkeypatch.setattr(safetensors_numpy, "save_file", save_file)
    with _raises(interrupt) as raised:
        save_variables(target, variables, "cnn", {})
    _assert_untouched(target)
    if isinstance(raised.value, OSError):
        assert raised.value.filename == str(target)
    monkeypatch.undo()
    save_variables(target, variables, "cnn", {})
    np.testing.assert_array_equal(
        load_variables(target)[0]["params"]["w"], variables["params"]["w"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.safetensors"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("atomic") / "run"
    assert main(["train", "cnn", "--workdir", str(workdir), "--max-steps", "2", *QUICK]) == 0
    return workdir


@pytest.mark.parametrize("how", sorted(INTERRUPTS))
def test_cli_export_is_one_line_and_keeps_the_old_artifact(
    trained, tmp_path, capsys, monkeypatch, how
):
    out = tmp_path / "model.jax"
    assert main(["export", "--workdir", str(trained), "--out", str(out)]) == 0
    good = out.read_bytes()
    capsys.readouterr()
    _interrupt_writes(monkeypatch, INTERRUPTS[how])
    status = main(["export", "--workdir", str(trained), "--out", str(out)])
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    if how == "disk full":
        assert status == 1
        assert line == f"jaxmodels: error: disk full ({out}: No space left on device)"
    else:
        assert status == 130 and "interrupted" in line
    assert "wrote" not in captured.out
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jax"]

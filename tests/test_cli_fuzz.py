"""Property-based fuzzing of the ``jaxmodels`` command line: random argument lists for every command
(their flags and choices read from ``jaxmodels.cli.build_parser()``) mixed with hostile values
(negative, zero, huge, nan, inf, empty, non-numbers, unknown and duplicate flags, paths that do not
exist or are files, a missing positional) never end in a traceback. Each example runs ``main(argv)``
in-process and must return 0, or 1 with one ``jaxmodels: error:`` line, or exit through argparse (2
with its usage and error lines, 0 for --help).

What would start long or outside work is kept tiny or stubbed, so that a valid argument list is
cheap: every path points into a temporary folder (the working folder is one too), ``train`` always
ends with ``--max-steps 1 --no-progress`` and its ``fit`` is replaced by one that only builds the
model's variables (``jax.eval_shape`` of ``init``: the model options are checked, nothing is
compiled), ``bench``'s timing (``jaxmodels.bench.run``) is a no-op once its results folder is
checked, ``jax.distributed.initialize`` is not called (it would wait for a coordinator) and
``urlopen`` fails as offline (``--download``). eval, export and sample see a real trained run
(``train cnn --max-steps 1``, before the stubs), its weights exported as safetensors, and a garbage
weights file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import random
import re
import shutil
import types
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import jax
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from jaxmodels import bench
from jaxmodels.arguments import host_port, key_value, non_negative_int, positive_int
from jaxmodels.cli import build_parser, main
from jaxmodels.commands import _example
from jaxmodels.data.datasets import dataset_options, list_datasets
from jaxmodels.nn.models import list_models, model_options
from jaxmodels.training import fit as fit_module

COMMANDS: dict[str, argparse.ArgumentParser] = next(
    action.choices
    for action in build_parser()._actions
    if isinstance(action, argparse._SubParsersAction)
)
# Options whose value is a file or folder: a token of PATHS, made a path in the example's folder.
PATH_FLAGS = {"--workdir", "--data-dir", "--data-file", "--out", "--output", "--weights"}
PATHS = [
    "<new>",  # does not exist
    "<new>.jax",
    "<new>.safetensors",
    "<file>",  # a text file (valid for --data-file)
    "<dir>",  # an empty folder
    "<under-file>",  # below a file
    "<run>",  # a trained cnn run (not given to train: --overwrite would move it)
    "<weights>",  # its variables, .safetensors
    "<garbage>",  # a .safetensors file that is not one
]
HOSTILE = [
    "-1", "0", "-0", "1e309", "99999999999999999999", "nan", "-nan", "inf", "-inf", "", " ",
    "abc", "1.5", "0x10", "1_000", "=", "a=b", "--", "-", "\x00", "é", "null", "[]", "{}",
    "true", "2147483648", "-9223372036854775809", "1e-320", "1e-9",
]  # fmt: skip
INTS = ["1", "2", "3", "8", "16"]
UNKNOWN = [
    "--bogus",
    "-x",
    "--work-dir",
    "--max_steps",
    "--",
    "-",
    "---",
    "--help=1",
    "-h",
    "--help",
]
OPTION_KEYS = sorted(
    {key for model in list_models() for key in model_options(model)}
    | {key for dataset in list_datasets() for key in dataset_options(dataset)}
    | {"nope", ""}
)
OPTION_VALUES = [
    *INTS, *HOSTILE, "[4]", "[0]", "[-1]", "[4, 4]", "[1, 1]", "[true]", "[]", '"VALID"',
    "SAME", "VALID", "bogus", "false", "0.9", "1.0", "-0.5", "100000", "pixels", "rows",
    "patches", "auto", "scan", "xla", "pallas", "[0, 1]",
]  # fmt: skip
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")
ARGPARSE_ERROR = re.compile(r"^jaxmodels( [\w-]+)?: error: ")
EXAMPLES = int(os.environ.get("JAXMODELS_FUZZ_EXAMPLES", 40))  # per command; more to hunt
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60


def _mostly(rnd: random.Random, valid: list[str], hostile: bool) -> str:
    """One of ``valid``; where ``hostile``, one time in six a hostile value instead."""
    return rnd.choice(HOSTILE) if hostile and rnd.random() < 1 / 6 else rnd.choice(valid)


def _value(rnd: random.Random, action: argparse.Action, command: str, hostile: bool) -> list[str]:
    """The value(s) after ``action``'s flag: mostly valid ones, else hostile."""
    flag = action.option_strings[0]
    if flag in PATH_FLAGS:
        valid = [p for p in PATHS if not (command == "train" and p == "<run>")]
        if flag == "--workdir" and command != "train":
            valid += ["<run>"] * 6  # mostly the trained run: eval and export go deep
    elif action.choices is not None:
        valid = sorted(action.choices)
    elif action.type is key_value:
        valid = [f"{rnd.choice(OPTION_KEYS)}={rnd.choice(OPTION_VALUES)}"]
    elif action.type is host_port:
        valid = ["localhost:1234", "h:0", ":1", "a:b", "h:70000"]
    elif action.type is None:  # text: --prompt
        valid = ["", "a", "ROMEO:", "\n", "\x00", "é", "日本", "🙂"]
    elif action.type in (positive_int, non_negative_int):
        valid = INTS
    else:  # floats
        valid = [*INTS, "0.5", "1e-3"]
    count = rnd.randint(0, 3) if action.nargs == "+" else 1
    return [_mostly(rnd, valid, hostile) for _ in range(count)]


def make_argv(rnd: random.Random, command: str) -> list[str]:
    """``command``, its positional and up to five flags of the command (duplicates included) with
    valid values; or, one time in two, a hostile list: some values hostile, the positional or
    export's --out missing one time in ten, and one time in three something odd (an unknown flag,
    a stray word) at a random place."""
    parser = COMMANDS[command]
    argv, hostile = [command], rnd.random() >= 0.5
    for action in (a for a in parser._actions if not a.option_strings):
        if action.nargs == "?" and rnd.random() < 0.5:
            continue  # eval's MODEL: the run's
        if not hostile or rnd.random() < 0.9:
            argv.append(_mostly(rnd, sorted(action.choices), hostile))
    if command == "export" and (not hostile or rnd.random() < 0.9):  # --out is required
        argv += ["--out", rnd.choice(["<new>.jax", "<new>.safetensors", *PATHS])]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for _ in range(rnd.randint(0, 5) if options else 0):
        action = rnd.choice(options)
        argv.append(rnd.choice(action.option_strings))
        if action.nargs != 0:  # not store_true
            argv += _value(rnd, action, command, hostile)
    if hostile and rnd.random() < 1 / 3:
        odd = [rnd.choice(UNKNOWN + HOSTILE)] + (["1"] if rnd.random() < 0.3 else [])
        at = rnd.randint(1, len(argv))
        argv[at:at] = odd
    if command == "train":  # a valid run stays tiny (and the last --max-steps wins)
        argv += ["--max-steps", "1", "--no-progress"]
    return argv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared files: a trained cnn run, its weights and a garbage weights file."""
    root = tmp_path_factory.mktemp("fuzz")
    run, weights = root / "run", root / "weights.safetensors"
    argv = ["train", "cnn", "--workdir", str(run), "--max-steps", "1", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--batch-size", "8"]) == 0
        assert main(["export", "--workdir", str(run), "--out", str(weights)]) == 0
    (root / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return types.SimpleNamespace(root=root, run=run, weights=weights, count=itertools.count())


def _paths(world, argv: list[str]) -> tuple[Path, list[str]]:
    """A fresh folder for the example (its working folder) and ``argv`` with its path tokens made
    paths: the files an example may overwrite are its own copies."""
    here = world.root / f"ex-{next(world.count)}"
    (here / "dir").mkdir(parents=True)
    (here / "file.txt").write_text(TEXT)
    shutil.copy(world.weights, here / "weights.safetensors")
    shutil.copy(world.root / "garbage.safetensors", here / "garbage.safetensors")
    tokens = {
        "<new>": here / "new",
        "<file>": here / "file.txt",
        "<dir>": here / "dir",
        "<under-file>": here / "file.txt" / "below",
        "<run>": world.run,
        "<weights>": here / "weights.safetensors",
        "<garbage>": here / "garbage.safetensors",
    }
    pattern = re.compile("|".join(re.escape(t) for t in tokens))
    return here, [pattern.sub(lambda m: str(tokens[m.group()]), word) for word in argv]


def _fake_fit(model, dataset, config, workdir, **kwargs):
    """``fit`` without the training: the model's variables built abstractly (its options checked)."""
    jax.eval_shape(model.init, jax.random.key(0), _example(model, dataset))
    state = types.SimpleNamespace(step=0, params={})
    return types.SimpleNamespace(state=state, history=[], test_metrics={"accuracy": 0.0})


def _offline(*args, **kwargs):
    raise urllib.error.URLError("offline (tests/test_cli_fuzz.py)")


@contextlib.contextmanager
def _no_long_work():
    with (
        mock.patch.object(fit_module, "fit", _fake_fit),
        mock.patch.object(bench, "run", lambda *args, **kwargs: None),
        mock.patch.object(jax.distributed, "initialize", lambda *args, **kwargs: None),
        mock.patch.object(urllib.request, "urlopen", _offline),
    ):
        yield


def check(argv: list[str]) -> str:
    """``main(argv)`` ends in 0, 1 with one error line, or argparse's exit; never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    exited = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status, exited = e.code, True
    text = err.getvalue()
    assert "Traceback" not in text and "internal error" not in text, (argv, text)
    lines = [line for line in text.splitlines() if line.strip() and not NATIVE_LOG.match(line)]
    if exited:  # argparse: --help, or usage and one error line
        assert status in (0, 2), (argv, status, text)
        if status == 2:
            assert lines[0].startswith("usage: jaxmodels"), (argv, text)
            assert ARGPARSE_ERROR.match(lines[-1]), (argv, text)
            assert len([line for line in lines if ARGPARSE_ERROR.match(line)]) == 1, (argv, text)
        return f"argparse exit {status}"
    assert type(status) is int and status in (0, 1), (argv, status, text)
    errors = [line for line in lines if line.startswith("jaxmodels: error: ")]
    others = [
        line
        for line in lines
        if not line.startswith(("jaxmodels: error: ", "jaxmodels: warning: "))
    ]
    assert len(errors) == (status == 1), (argv, status, text)
    assert not others, (argv, status, text)
    return f"status {status}"


FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@FUZZ
@given(data=st.data())
def test_no_argument_list_gives_a_traceback(world, command, data):
    argv = make_argv(data.draw(st.randoms(use_true_random=False)), command)
    note(f"argv: {argv}")
    here, argv = _paths(world, argv)
    cwd = os.getcwd()
    os.chdir(here)  # a default folder (runs/..., benchmarks/results) is the example's
    try:
        with _no_long_work():
            event(check(argv))  # --hypothesis-show-statistics: how many got how far
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "argv",
    [[], ["--bogus"], ["nope"], ["-h"], ["", "train"], ["TRAIN"], ["tra"], ["info", "extra"]],
)
def test_no_command_or_an_unknown_one_is_argparses_error(argv):
    check(argv)

"""The benchmark harness: FLOP counts, a smoke run of both suites on tiny shapes, the CLI.

No test asserts a timing: only that every contender ran, and the files and ratios are consistent.
"""

import json

import pytest

import jaxmodels as jm
from jaxmodels import bench, cli


def test_lstm_flops_formula():
    # 2·T·B·(F+H)·4H forward; 3x for the training step
    assert bench.lstm_flops(256, 64, 150) == 2 * 150 * 64 * (256 + 256) * 4 * 256
    assert bench.lstm_flops(8, 2, 3, features=4, train=True) == 3 * 2 * 3 * 2 * (4 + 8) * 4 * 8


def test_cnn_flops_of_the_seed_cnn():
    # conv 26x26x32 (k=3x3x1), pool 13, conv 11x11x64 (3x3x32), pool 5, conv 3x3x64 (3x3x64), dense 576-64-10
    per_image = 2 * (
        26 * 26 * 32 * 9 + 11 * 11 * 64 * 9 * 32 + 3 * 3 * 64 * 9 * 64 + 576 * 64 + 64 * 10
    )
    assert bench.cnn_flops(jm.CNN(), 1) == per_image
    assert bench.cnn_flops(jm.CNN(), 128, train=True) == 3 * 128 * per_image


def test_time_workload_interleaves_and_reports_errors():
    calls = []

    def contender(name, fail=False):
        def setup():
            if fail:
                raise RuntimeError("no such backend")
            return lambda: calls.append(name)

        return bench.Contender(name, setup)

    workload = bench.Workload(
        "w", "g", 1.0, [contender("a"), contender("b"), contender("c", fail=True)]
    )
    records = bench.time_workload(workload, repeats=3, warmup=1, min_sample_s=0.0)
    assert [r["name"] for r in records] == ["a", "b", "c"]
    assert records[2]["error"] == "RuntimeError: no such backend" and "median_s" not in records[2]
    for r in records[:2]:
        assert (
            r["number"] == 1
            and len(r["samples_s"]) == 3
            and r["min_s"] <= r["median_s"] <= r["max_s"]
        )
    # first call + 1 warm-up each, then rounds: each contender once per round
    assert calls[:4] == ["a", "a", "b", "b"]
    assert [sorted(calls[i : i + 2]) for i in range(4, 10, 2)] == [["a", "b"]] * 3


def test_time_workload_varies_who_runs_after_whom():
    calls = []
    names = "abcd"
    contenders = [bench.Contender(n, lambda n=n: lambda: calls.append(n)) for n in names]
    bench.time_workload(
        bench.Workload("w", "g", 1.0, contenders), repeats=8, warmup=0, min_sample_s=0.0
    )
    rounds = [calls[i : i + 4] for i in range(4, len(calls), 4)]
    assert len(rounds) == 8 and all(sorted(r) == list(names) for r in rounds)
    for n in names:  # a fixed cyclic order would give each one predecessor within rounds
        predecessors = {r[r.index(n) - 1] for r in rounds if r.index(n) > 0}
        assert len(predecessors) >= 2, (n, predecessors)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = cli.main(
        [
            "bench",
            "all",
            "--shapes",
            "small",
            "--repeats",
            "2",
            "--torch-threads",
            "1",
            "--out",
            str(out),
        ]
    )
    return status, out


@pytest.mark.parametrize("suite", bench.SUITES)
def test_smoke_run_writes_consistent_results(smoke, suite):
    status, out = smoke
    assert status == 0
    for ext in ("json", "md", "png"):
        assert (out / f"{suite}-small.{ext}").stat().st_size > 0
    result = json.loads((out / f"{suite}-small.json").read_text())
    env = result["environment"]
    assert (
        env["versions"]["jax"]
        and env["versions"]["jaxlib"]
        and "xla_flags" in env
        and env["cpu_count"] >= 1
    )
    assert result["peak"]["gflops"] > 0 and len(result["peak"]["runs"]) == 2
    assert result["workloads"], "no workloads"
    baseline = result["baseline"]
    for workload in result["workloads"]:
        names = [r["name"] for r in workload["contenders"]]
        assert baseline in names
        for r in workload["contenders"]:
            assert "error" not in r, (workload["name"], r["name"], r.get("error"))
            assert len(r["samples_s"]) == 2 and r["median_s"] > 0 and r["compile_s"] > 0
            assert r["gflops"] > 0 and r["frac_peak"] > 0
            if r["name"] == baseline:
                assert r["speedup"][baseline] == pytest.approx(1.0)
    table = (out / f"{suite}-small.md").read_text()
    assert f"x {baseline}" in table and "XLA_FLAGS" in table


def test_smoke_run_has_the_named_contenders(smoke):
    _, out = smoke
    lstm = json.loads((out / "lstm-small.json").read_text())
    names = {r["name"] for r in lstm["workloads"][0]["contenders"]}
    assert {bench.LSTM_NAIVE, bench.LSTM_FLAX, bench.LSTM_SCAN} <= names
    assert any(n.startswith("jax.experimental.rnn") for n in names)
    assert (bench.LSTM_PALLAS in names) == (lstm["environment"]["backend"] in ("gpu", "tpu"))
    cnn = json.loads((out / "cnn-small.json").read_text())
    names = {r["name"] for r in cnn["workloads"][0]["contenders"]}
    assert bench.CNN_PLAIN in names and {n for n, _ in bench.cnn_variants()} <= names
    assert {w["group"] for w in cnn["workloads"]} == {"training step (Adam)", "inference"}


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "lstm", "--repeats", "0"])
    assert exit_.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a suite"):
        bench.build_suite("gru")


def test_cnn_variants_follow_a_conv_impl_option(monkeypatch):
    import typing

    import jaxmodels
    from jaxmodels import layers

    # the library's option: one contender per value of layers.CONV_IMPLS
    assert bench.cnn_variants() == [
        (f"jaxmodels CNN(conv_impl={v!r})", {"conv_impl": v}) for v in layers.CONV_IMPLS
    ]

    # without a CONV_IMPLS list, the values come from a Literal annotation
    class CNNWithImpl(jm.CNN):
        conv_impl: typing.Literal["xla", "patches"] = "xla"

    monkeypatch.setattr(jaxmodels, "CNN", CNNWithImpl)
    monkeypatch.delattr(layers, "CONV_IMPLS")
    assert bench.cnn_variants() == [
        ("jaxmodels CNN(conv_impl='xla')", {"conv_impl": "xla"}),
        ("jaxmodels CNN(conv_impl='patches')", {"conv_impl": "patches"}),
    ]

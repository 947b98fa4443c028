"""The benchmark harness: FLOP counts, the interleaved rounds, the worker processes (a smoke run of
both suites on tiny shapes, each framework configuration in its own process; a worker that dies or
hangs), the PyTorch configurations, the CLI.

No test asserts a timing: only that every contender ran (or was skipped for a stated reason), in
the process it should, and that the files and ratios are consistent.
"""

import functools
import json
import signal
import sys
import time
from pathlib import Path

import pytest

import jaxmodels as jm
from jaxmodels import bench, cli, records
from jaxmodels.bench import pool, timing, torch_configs, torch_models
from jaxmodels.kernels import lstm_cpu
from jaxmodels.records import version

HAS_TORCH = version("torch") is not None
JEMALLOC = torch_configs.find_library("libjemalloc.so.2")


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
        assert r["process"] == "this process" and r["allocator"] == "as installed"
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


def test_rounds_sampled_spreads_a_slow_contender_over_the_run():
    assert timing.rounds_sampled(1.0, 10, None) == list(range(10))
    assert timing.rounds_sampled(6.0, 10, 60.0) == list(range(10))  # 10 samples fit exactly
    assert timing.rounds_sampled(12.0, 10, 60.0) == [0, 2, 4, 6, 8]  # 5 fit
    assert timing.rounds_sampled(100.0, 10, 60.0) == [0, 3, 6]  # none fit: MIN_ROUNDS
    assert timing.rounds_sampled(100.0, 2, 60.0) == [0, 1]  # never more than the rounds


def test_time_workload_samples_a_slow_contender_in_fewer_rounds():
    """On a clock where "slow" takes 10 s a call and "fast" 1 ms, a 35 s budget over 10 rounds
    gives "slow" MIN_ROUNDS samples in rounds 0, 3 and 6, and "fast" all ten."""
    now = [0.0]
    calls = []

    def contender(name, seconds):
        def step():
            calls.append(name)
            now[0] += seconds

        return bench.Contender(name, lambda: step)

    workload = bench.Workload("w", "g", 1.0, [contender("slow", 10.0), contender("fast", 1e-3)])
    slow, fast = bench.time_workload(
        workload, repeats=10, warmup=1, min_sample_s=0.0, budget_s=35.0, clock=lambda: now[0]
    )
    assert slow["rounds"] == [0, 3, 6] and slow["samples_s"] == pytest.approx([10.0] * 3)
    assert "rounds" not in fast and len(fast["samples_s"]) == 10
    assert calls[4:].count("slow") == 3 and calls[4:].count("fast") == 10  # after the setups
    table = bench.markdown(
        {
            "suite": "s", "environment": records.environment(frameworks=("jax",)), "loadavg": None,
            "isolation": "shared", "peak": {"gflops": 1.0, "runs": [{"n": 8, "gflops": 1.0}] * 2},
            "repeats": 10, "min_sample_s": 0.0, "budget_s": 35.0, "notes": [], "processes": [],
            "baseline": "fast", "compare": [],
            "workloads": [{"name": "w", "group": "g", "flops": 1.0, "info": {}, "contenders": [
                dict(r, compile_s=0.0, gflops=1.0, frac_peak=1.0, speedup={"fast": 1.0})
                for r in (slow, fast)]}],
        }
    )  # fmt: skip
    assert "(3 rounds)" in table and "more than 35 s is sampled in fewer rounds" in table


def test_pytorch_bfloat16_runs_as_installed_only_without_bfloat16_instructions(monkeypatch):
    allocators = tuple(bench.ALLOCATORS)
    assert torch_configs.bfloat16_allocators(allocators, ["avx2", "fma"]) == ("as installed",)
    assert torch_configs.bfloat16_allocators(allocators, ["avx512_bf16"]) == allocators
    assert torch_configs.bfloat16_allocators(allocators, ["amx_bf16"]) == allocators
    monkeypatch.setattr(torch_configs, "cpu_model", lambda: ("a CPU", ["avx2", "fma"]))
    setup = functools.partial(torch_models.cnn, batch=2, train=False)
    half = torch_configs.torch_dtype_contenders(
        "PyTorch", setup, "bfloat16", torch_threads=2, allocators=allocators
    )
    assert {(c.allocator, c.variant) for c in half} == {
        ("as installed", "bfloat16"), ("as installed", "autocast bfloat16")
    }  # fmt: skip
    assert len(half) == 4  # two thread counts each
    full = torch_configs.torch_dtype_contenders(
        "PyTorch", setup, "float32", torch_threads=2, allocators=allocators
    )
    assert len(full) == 6
    note = torch_configs.torch_note(2, allocators, ["float32", "bfloat16"])
    assert "In bfloat16 PyTorch runs as installed only" in note
    assert "as installed only" not in torch_configs.torch_note(2, allocators, ["float32"])


def test_torch_contenders_cover_every_allocator_and_thread_count():
    setup = functools.partial(torch_models.cnn, batch=2, train=False)
    contenders = torch_configs.torch_contenders(
        "PyTorch", setup, torch_threads=2, allocators=tuple(bench.ALLOCATORS)
    )
    assert [(c.name, c.allocator, c.threads) for c in contenders] == [
        ("PyTorch", "as installed", 2),
        ("PyTorch (1 thread)", "as installed", 1),
        ("PyTorch (jemalloc)", "jemalloc", 2),
        ("PyTorch (1 thread, jemalloc)", "jemalloc", 1),
        ("PyTorch (tcmalloc)", "tcmalloc", 2),
        ("PyTorch (1 thread, tcmalloc)", "tcmalloc", 1),
    ]
    assert all(c.framework == "torch" and c.setup is setup for c in contenders)
    one = torch_configs.torch_contenders("PyTorch", setup, torch_threads=1)
    assert [(c.name, c.threads) for c in one] == [("PyTorch", 1)]


def test_a_missing_allocator_is_skipped_naming_its_debian_package(monkeypatch):
    monkeypatch.setitem(torch_configs.ALLOCATORS, "nosuch", ("libnosuch-alloc.so.9", "libnosuch9"))
    assert torch_configs.find_library("libnosuch-alloc.so.9") is None
    reason = "libnosuch-alloc.so.9 not found: install the Debian package libnosuch9"
    assert torch_configs.allocator_library("nosuch") == (None, reason)
    with pytest.raises(ValueError, match="expected an allocator"):
        torch_configs.allocator_library("mimalloc")
    # no process is started for it; its contenders are skipped with the reason
    workers = pool.Pool(torch_threads=1, allocators=("nosuch",))
    (contender,) = torch_configs.torch_contenders(
        "t", functools.partial(torch_models.cnn, batch=1, train=False), torch_threads=1,
        allocators=("nosuch",),
    )  # fmt: skip
    records = bench.time_workload(
        bench.Workload("w", "g", 1.0, [contender]), repeats=1, executor=workers
    )
    assert records[0]["skipped"] == reason and records[0]["process"] == "torch, nosuch, 1 thread"
    assert all(w.proc is None for w in workers.workers.values())


def test_setups_for_a_worker_are_module_level():
    assert pool.target(functools.partial(timing.peak_setup, 8)) == {
        "module": "jaxmodels.bench.timing",
        "function": "peak_setup",
        "args": (8,),
        "kwargs": {},
    }
    with pytest.raises(ValueError, match="module-level setups only"):
        pool.target(lambda: None)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    torch_before = "torch" in sys.modules
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
    # the parent leaves torch to the workers (seen only where no earlier test imported it)
    assert torch_before or "torch" not in sys.modules
    return status, out


def _known_torch_refusal(record: dict) -> bool:
    """PyTorch's bfloat16 LSTM under autocast runs oneDNN's LSTM primitive, which a CPU without
    bfloat16 instructions (AVX2 only) cannot create: an error the report shows, not ours."""
    return record.get(
        "variant"
    ) == "autocast bfloat16" and "primitive descriptor for the LSTM" in record.get("error", "")


def _load(out, suite):
    return json.loads((out / f"{suite}-small.json").read_text())


@pytest.mark.parametrize("suite", bench.SUITES)
def test_smoke_run_writes_consistent_results(smoke, suite):
    status, out = smoke
    assert status == 0
    for ext in ("json", "md", "png"):
        assert (out / f"{suite}-small.{ext}").stat().st_size > 0
    result = _load(out, suite)
    assert result["isolation"] == "process"
    env = result["environment"]
    assert (
        env["versions"]["jax"]
        and env["versions"]["jaxlib"]
        and "xla_flags" in env
        and env["cpu_count"] >= 1
    )
    if Path("/proc/cpuinfo").exists():  # Linux: the model and the vector features that decide speed
        assert env["cpu_model"] and set(env["cpu_features"]) <= set(records.CPU_FEATURES)
        assert env["cpu_model"] in (out / f"{suite}-small.md").read_text()
    assert result["peak"]["gflops"] > 0 and len(result["peak"]["runs"]) == 2
    assert result["workloads"], "no workloads"
    baseline = result["baseline"]
    for workload in result["workloads"]:
        names = [r["name"] for r in workload["contenders"]]
        assert baseline in names
        for r in workload["contenders"]:
            assert r["process"] == ("jax" if r["framework"] == "jax" else
                                    f"torch, {r['allocator']}, 1 thread"), r  # fmt: skip
            # A missing allocator library is known before any process starts; then torch's import.
            if (
                r["framework"] == "torch"
                and r["allocator"] != "as installed"
                and not torch_configs.allocator_library(r["allocator"])[0]
            ):
                assert "Debian package" in r["skipped"], r
                continue
            if r["framework"] == "torch" and not HAS_TORCH:
                assert "torch cannot be imported" in r["skipped"], r
                continue
            if _known_torch_refusal(r):
                continue
            assert "error" not in r and "skipped" not in r, (workload["name"], r)
            assert len(r["samples_s"]) == 2 and r["median_s"] > 0 and r["compile_s"] > 0
            assert r["gflops"] > 0 and r["frac_peak"] > 0 and r["pid"] > 0
            if r["name"] == baseline:
                assert r["speedup"][baseline] == pytest.approx(1.0)
        torch = [r for r in workload["contenders"] if "median_s" in r and r["framework"] == "torch"]
        strongest = workload["strongest_torch"]
        if torch:  # the fastest PyTorch configuration, and every ratio against it
            assert strongest == min(torch, key=lambda r: r["median_s"])["name"]
            for r in workload["contenders"]:
                if "median_s" in r:
                    assert r["speedup"][strongest] == pytest.approx(
                        next(t["median_s"] for t in torch if t["name"] == strongest) / r["median_s"]
                    )
        else:
            assert strongest is None and not HAS_TORCH
    table = (out / f"{suite}-small.md").read_text()
    assert f"x {baseline}" in table and "XLA_FLAGS" in table and "## Processes" in table
    if HAS_TORCH:
        assert "x strongest PyTorch" in table and "PyTorch configurations, median ms" in table
        assert "| as installed, 1 thread |" in table
        if JEMALLOC:
            assert "| jemalloc, 1 thread |" in table
    else:
        assert "Not run here:" in table and "torch cannot be imported" in table


def test_smoke_run_has_the_named_contenders(smoke):
    _, out = smoke
    lstm = _load(out, "lstm")
    names = {r["name"] for r in lstm["workloads"][0]["contenders"]}
    assert {bench.LSTM_NAIVE, bench.LSTM_FLAX, bench.LSTM_SCAN} <= names
    assert {bench.LSTM_TORCH, f"{bench.LSTM_TORCH} (jemalloc)"} <= names
    assert f"{bench.LSTM_TORCH} (tcmalloc)" in names
    assert any(n.startswith("jax.experimental.rnn") for n in names)
    assert (bench.LSTM_PALLAS in names) == (lstm["environment"]["backend"] in ("gpu", "tpu"))
    cnn = _load(out, "cnn")
    names = {r["name"] for r in cnn["workloads"][0]["contenders"]}
    assert bench.CNN_PLAIN in names and {n for n, _ in bench.cnn_variants()} <= names
    assert {bench.CNN_TORCH, f"{bench.CNN_TORCH} (jemalloc)"} <= names
    groups = {"training step (Adam)", "inference"}
    assert {w["group"] for w in cnn["workloads"]} == groups | {f"{g}, bfloat16" for g in groups}


def test_smoke_run_times_bfloat16_beside_float32(smoke):
    """Each suite's bfloat16 workloads mirror its float32 ones: ours and the Flax baseline with
    float32 parameters computing in bfloat16, PyTorch cast and under autocast, each variant its
    own column of the PyTorch table; the compiled CPU kernel, where it runs, in both."""
    _, out = smoke
    lstm = _load(out, "lstm")
    if lstm["environment"]["backend"] == "cpu" and lstm_cpu.unavailable() is None:
        for w in lstm["workloads"]:
            assert bench.LSTM_CPU in {r["name"] for r in w["contenders"]}, w["group"]
    for suite, ours, torch_name in (
        ("lstm", bench.LSTM_SCAN, bench.LSTM_TORCH),
        ("cnn", "jaxmodels CNN(conv_impl='xla')", bench.CNN_TORCH),
    ):
        result = _load(out, suite)
        by_dtype = {}
        for w in result["workloads"]:
            by_dtype.setdefault(w["info"]["dtype"], []).append(w)
        assert set(by_dtype) == {"float32", "bfloat16"}
        assert [w["name"] for w in by_dtype["float32"]] == [w["name"] for w in by_dtype["bfloat16"]]
        for w in by_dtype["bfloat16"]:
            assert w["group"].endswith(", bfloat16")
            records = {r["name"]: r for r in w["contenders"]}
            assert ours in records and result["baseline"] in records
            assert "median_s" in records[ours] and "median_s" in records[result["baseline"]]
            if HAS_TORCH:
                variants = {r.get("variant") for r in records.values() if r["framework"] == "torch"}
                assert variants == {"bfloat16", "autocast bfloat16"}
                cast = records[f"{torch_name} bfloat16"]
                assert "median_s" in cast, cast
        table = (out / f"{suite}-small.md").read_text()
        assert ", bfloat16" in table
        if HAS_TORCH:
            assert "| bfloat16, as installed, 1 thread |" in table


def test_smoke_run_records_every_process(smoke):
    """One JAX process and one per PyTorch allocator (one thread count here), each with its own
    environment; a PyTorch process never imported jax while it timed."""
    _, out = smoke
    processes = {p["name"]: p for p in _load(out, "lstm")["processes"]}
    assert set(processes) == {"jax"} | {
        f"torch, {a}, 1 thread" for a in ("as installed", "jemalloc", "tcmalloc")
    }
    assert processes["jax"]["status"] == "ran" and processes["jax"]["environment"]["backend"]
    pids = [p["pids"] for p in processes.values() if p["pids"]]
    assert len({pid for ps in pids for pid in ps}) == len(pids)  # one process each
    for name, p in processes.items():
        if name != "jax" and p["status"] != "skipped":
            assert p["jax_imported"] is False, name
            assert p["environment"]["versions"]["python"], name
            assert (p["status"] == "ran") == HAS_TORCH, p
            if HAS_TORCH:
                assert p["hello"]["threads"] == 1 and p["environment"]["torch_threads"] == 1


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 not installed (libjemalloc2)")
def test_jemalloc_worker_runs_with_jemalloc_preloaded(smoke):
    _, out = smoke
    processes = {p["name"]: p for p in _load(out, "cnn")["processes"]}
    jemalloc = processes["torch, jemalloc, 1 thread"]
    assert jemalloc["library"] == JEMALLOC
    assert JEMALLOC in jemalloc["environment"]["env"]["LD_PRELOAD"].split(":")
    assert jemalloc["hello"]["preloaded"] == [JEMALLOC]  # mapped into the process
    installed = processes["torch, as installed, 1 thread"]
    assert "libjemalloc" not in installed["environment"]["env"].get("LD_PRELOAD", "")
    assert not any("jemalloc" in lib for lib in installed["hello"]["preloaded"])


def test_a_worker_that_dies_or_hangs_is_reported_and_the_run_goes_on():
    peak = bench.Contender("matmul", functools.partial(timing.peak_setup, 8))
    dies = bench.Contender("dies", functools.partial(signal.raise_signal, signal.SIGKILL))
    hangs = bench.Contender("hangs", functools.partial(time.sleep, 600))
    # 10 s: the worker's setups (a jit compile) must fit it on a loaded machine; the hang must not
    timeouts = bench.Timeouts(setup=10.0, stop=2.0)
    start = time.perf_counter()
    with bench.Pool(allocators=(), timeouts=timeouts) as workers:
        runs = [
            bench.time_workload(
                bench.Workload(name, "g", 1.0, contenders), repeats=2, executor=workers
            )
            for name, contenders in [("1", [dies, peak]), ("2", [peak, hangs]), ("3", [peak])]
        ]
        jax_worker = workers.workers["jax"]
    assert time.perf_counter() - start < 120
    deaths, pids = jax_worker.info["deaths"], jax_worker.info["pids"]
    (died, after), (lost, hung), (again,) = runs
    assert "died (killed by SIGKILL)" in died["error"] and "samples_s" not in died
    assert len(after["samples_s"]) == 2 and after["pid"] != pids[0]  # a fresh process
    assert "no answer to setup within 10 s: killed" in hung["error"]
    assert "error" in lost and "worker jax" in lost["error"]  # its process was killed
    assert len(again["samples_s"]) == 2 and again["pid"] == pids[-1]
    assert len(deaths) == 2 and len(pids) == 3
    assert jax_worker.info["status"] == "ran" and jax_worker.proc.poll() is not None  # stopped


def test_shared_isolation_runs_in_this_process(monkeypatch):
    suite = bench.Suite(
        "tiny",
        [bench.Workload("w", "g", 2.0 * 8**3, [
            bench.Contender("matmul", functools.partial(timing.peak_setup, 8)),
            bench.Contender("jemalloc one", lambda: None, "torch", threads=1, allocator="jemalloc"),
        ])],
        baseline="matmul",
        peak_n=8,
    )  # fmt: skip
    result = bench.run_suite(suite, repeats=2, min_sample_s=0.0, log=None)
    assert result["isolation"] == "shared"
    matmul, jemalloc = result["workloads"][0]["contenders"]
    assert matmul["process"] == "this process" and matmul["speedup"] == {"matmul": 1.0}
    assert "needs its own process" in jemalloc["skipped"]
    assert [p["name"] for p in result["processes"]] == ["this process"]
    assert "Isolation `shared`" in bench.markdown(result)


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "lstm", "--repeats", "0"])
    assert exit_.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "lstm", "--isolation", "threads"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a suite"):
        bench.build_suite("gru")
    with pytest.raises(ValueError, match="expected a suite"):
        bench.run(["gru"], isolation="process")  # before any process starts
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "lstm", "--dtypes", "float16"])
    assert exit_.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected dtypes among"):
        bench.run(["lstm"], dtypes=[])  # before any process starts
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "lstm", "--budget", "0"])
    assert exit_.value.code == 2 and "--budget" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a budget of seconds > 0"):
        bench.run(["lstm"], budget_s=0.0)  # before any process starts


def test_dtypes_select_the_workloads():
    """``--dtypes float32`` times the float32 groups only, ``bfloat16`` their twins only."""
    for name in bench.SUITES:
        whole = bench.build_suite(name, "small").workloads
        for dtype in bench.DTYPES:
            chosen = bench.build_suite(name, "small", dtypes=[dtype]).workloads
            assert [w.group for w in chosen] == [w.group for w in whole if w.info["dtype"] == dtype]
            assert chosen and all(w.info["dtype"] == dtype for w in chosen)


def test_cnn_variants_are_one_contender_per_conv_impl():
    assert bench.cnn_variants() == [
        ("jaxmodels CNN(conv_impl='patches')", {"conv_impl": "patches"}),
        ("jaxmodels CNN(conv_impl='xla')", {"conv_impl": "xla"}),
    ]

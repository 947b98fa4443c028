"""benchmarks/latency_model.py: the estimate follows the kernels' plans for each GPU and says so."""

import importlib.util
import json
from pathlib import Path

import pytest

from jaxmodels import targets

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_model.py"


@pytest.fixture(scope="module")
def model():
    """The script as a module; skipped where this jax has no GPU compiler (its CUDA plugin is
    published after each jax release), as the compile tests are: the plans are compiled ones."""
    spec = importlib.util.spec_from_file_location("latency_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for gpu in module.GPUS:
        try:
            targets.device(gpu)
        except RuntimeError as e:
            pytest.skip(str(e))
    return module


def test_writes_the_estimate_for_every_gpu_and_shape(model, tmp_path):
    assert model.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latency_model.json").read_text())
    rows = result["rows"]
    assert {(r["gpu"], r["hidden"], r["batch"], r["time"], r["dtype"]) for r in rows} == {
        (g, h, b, t, d) for g in model.GPUS for h, b, t, d, _ in model.SHAPES
    }
    for r in rows:
        # a scan step is a stepwise step with more launches; every step takes some time
        assert r["scan_us"] > r["stepwise_us"] > 0
        assert r["fastest"] in r["sequence_ms"]
        assert r["sequence_ms"][r["fastest"]] == min(r["sequence_ms"].values())
    markdown = (tmp_path / "latency_model.md").read_text()
    assert "an estimate" in markdown and "Estimates, not measurements" in markdown
    assert "FlashRNN" in markdown and "DeepBench" in markdown


def test_paths_exist_where_the_kernels_plans_fit(model):
    # float32 hidden 64 fits one SM's shared memory on both GPUs; 256 does not (4·256²·4 bytes)
    for gpu in model.GPUS:
        small = model.step_estimates(gpu, 64, 64, "float32")
        large = model.step_estimates(gpu, 256, 64, "float32")
        assert small["persistent"] is not None and large["persistent"] is None
        assert large["grid"] is not None and large["grid_programs"] == 256 // 16
        # hidden 1024 in float32 is past the grid kernel's register limit (448)
        assert model.step_estimates(gpu, 1024, 64, "float32")["grid"] is None
    # batch groups of 16 rows, one launch each: batch 64 takes four launches over all steps
    assert model.step_estimates("h100", 256, 64, "float32")["grid_launches"] == 4


def test_the_product_uses_the_sms_its_tiles_occupy(model):
    assert model.tiles(64, 4 * 256) == 8 and model.tiles(129, 128) == 2
    # hidden 256: w_h (0.5 MB) from L2 takes less than the product, which is compute-bound; twice
    # the rows in the same tiles: twice the FLOPs on as many SMs, twice the time
    one, two = (model.product_s("h100", "bfloat16", b, 256) for b in (32, 64))
    assert two == pytest.approx(2 * one)
    # hidden 4096: w_h (128 MiB) is past L2 and its read from HBM bounds both
    one, two = (model.product_s("h100", "bfloat16", b, 4096) for b in (32, 64))
    assert one == two == pytest.approx(4 * 4096 * 4096 * 2 / 3.35e12)

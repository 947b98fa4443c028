"""benchmarks/lstm_floor.py: the floor's arithmetic, a smoke run at tiny shapes, bad arguments."""

import importlib.util
import json
from pathlib import Path

import pytest

from jaxmodels import bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lstm_floor.py"


@pytest.fixture(scope="module")
def lstm_floor():
    spec = importlib.util.spec_from_file_location("lstm_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_sums_the_cheaper_matmul_form_and_the_gradient_flops_at_peak(lstm_floor):
    hidden, batch, time = 4, 2, 3
    medians = {
        "x_t W_x + h W_h loop": 10.0,
        "h W_h loop": 1.0,
        "gate math loop": 2.0,
        "fresh hs": 0.5,
        "fresh residuals (5 hidden a step)": 0.25,
        "δpre W_hᵀ loop": 3.0,
        "backward gate math loop": 4.0,
        "fresh δxs": 0.125,
    }
    peak = 2.0 * time * batch * hidden * 4 * hidden  # the input projection takes 1 s at this peak
    forward = lstm_floor.floor(medians, peak, hidden, batch, time, train=False)
    assert forward["terms_s"] == {"recurrent matmuls": 2.0, "gate math": 2.0, "fresh hs": 0.5}
    assert forward["floor_s"] == 4.5 and forward["floor_without_gate_math_s"] == 2.5
    medians["h W_h loop"] = 20.0  # now the loop with both matmuls is the cheaper form
    train = lstm_floor.floor(medians, peak, hidden, batch, time, train=True)
    assert train["terms_s"]["recurrent matmuls"] == 10.0
    assert train["terms_s"]["weight and input gradients at peak"] == pytest.approx(
        3.0
    )  # δW_x, δW_h, δx
    assert train["floor_s"] == pytest.approx(10 + 2 + 0.5 + 0.25 + 3 + 4 + 3 + 0.125)
    assert train["floor_without_gate_math_s"] == pytest.approx(train["floor_s"] - 6)


def test_smoke_run_writes_the_floor_beside_the_contenders(lstm_floor, tmp_path):
    assert (
        lstm_floor.main(
            ["--shape", "8,2,3", "--repeats", "2", "--peak-n", "64", "--out", str(tmp_path)]
        )
        == 0
    )
    result = json.loads((tmp_path / "lstm_floor-8x2x3.json").read_text())
    assert result["shape"] == {"hidden": 8, "batch": 2, "time": 3, "features": 8}
    assert set(result["passes"]) == {"forward", "training step"}
    for name, p in result["passes"].items():
        names = {r["name"] for r in p["records"]}
        assert {bench.LSTM_FLAX, bench.LSTM_SCAN} <= names and "gate math loop" in names
        assert all("error" not in r and r["median_s"] > 0 for r in p["records"]), name
        assert p["floor_s"] == pytest.approx(sum(p["terms_s"].values()))
        assert 0 < p["floor_without_gate_math_s"] < p["floor_s"]
    assert len(result["passes"]["training step"]["terms_s"]) == 8
    table = (tmp_path / "lstm_floor-8x2x3.md").read_text()
    assert "**floor**" in table and "could gain over Flax" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "8,2"], "three positive integers"),
        (["--shape", "8,0,3"], "three positive integers"),
        (["--repeats", "0"], "--repeats >= 1"),
    ],
)
def test_bad_arguments_are_named(lstm_floor, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        lstm_floor.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err

"""How fast can an LSTM layer run under XLA on this machine? A measured lower bound, beside Flax
and ``lstm_scan``, all in one JAX process (PyTorch, not lowered by XLA, is compared with both in
its own processes by ``jaxmodels bench lstm``).

    python benchmarks/lstm_floor.py                       # (256, 64, 150) -> benchmarks/results/lstm_floor.{json,md}
    python benchmarks/lstm_floor.py --shape 16,2,5 --repeats 2 --out /tmp/floor   # a smoke run

Every forward pass, however written, runs ``time`` dependent steps of h_{t-1} W_h and of the gate
math (the next step needs this step's h), projects every x_t, and writes hs; every training step
also keeps what the backward needs (per step at least the four gates, or their pre-activations,
and C_t: 5·hidden numbers), runs ``time`` dependent steps of δpre_t W_hᵀ and of the gate
gradients, computes δW_x, δW_h and δx (2·T·B·4H·(F+H+F) FLOPs), and writes δxs. The pieces are
timed here alone, each in its cheapest form, interleaved with the real contenders
(``jaxmodels.bench.time_workload``):

- recurrent matmuls: a dependent loop of x_t W_x + h_{t-1} W_h (nothing else in the step but a
  scale); or of h_{t-1} W_h alone, with every x_t W_x charged at the peak rate; the cheaper counts;
- gate math: a dependent loop of the LSTM step after the matmuls (``cells.lstm_update``), and of
  its backward (``kernels.common.lstm_gate_gradients``, the gate backward ``recurrent`` uses, from
  the saved gates and tanh(C_t), plus a sum of the four gate blocks that carries the dependency),
  on inputs that stay in cache;
- weight and input gradients: their FLOPs at the peak rate of a 2048^3 float32 matmul measured in
  the same run;
- fresh memory: writing hs, the residuals and δxs into a new XLA buffer, as every jitted call does
  (its first touch of fresh pages costs far more than the write itself).

The floor is the sum of the pieces. The matmul pieces keep both cores busy; the gate math runs on
one, so a perfect schedule could hide it behind other work: the floor without the gate math is
reported too. No XLA-lowered implementation can run faster than the second number unless it
finds a faster matmul than XLA's own. Each piece is one jitted call, so the floor counts a call's
dispatch (tens of microseconds) once per piece: negligible at the default shape, dominant at tiny
ones, where the floor means nothing (the smoke run's shapes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels import bench, records
from jaxmodels.kernels.common import lstm_gate_gradients
from jaxmodels.nn import cells

DEFAULT_SHAPE = (256, 64, 150)  # (hidden, batch, time): the shape of issue 5's targets
CONTENDERS = (bench.LSTM_FLAX, bench.LSTM_SCAN)
SCALE = 0.01  # keeps the dependent loops' values bounded


def _jax_piece(name: str, fn, *args) -> bench.Contender:
    def setup():
        jitted = jax.jit(fn)
        return lambda: jitted(*args)

    return bench.Contender(name, setup)


def floor_pieces(hidden: int, batch: int, time: int, *, train: bool) -> list[bench.Contender]:
    """The measured pieces of the floor at (hidden, batch, time), features = hidden, float32."""
    features = hidden
    keys = jax.random.split(jax.random.key(2), 6)
    params = cells.init_lstm(keys[0], features, hidden)
    w_x, w_h = params["w_x"], params["w_h"]
    xs = jax.random.normal(keys[1], (time, batch, features))  # time-major: no transpose charged
    h0 = jax.random.normal(keys[2], (batch, hidden))
    pre = jax.random.normal(keys[3], (batch, 4 * hidden))
    saved = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, 5 * hidden)))
    c_in = jax.random.normal(keys[5], (batch, hidden))

    def both_matmuls(w_x, w_h, xs, h):
        def step(h, x_t):
            return (x_t @ w_x + h @ w_h)[:, :hidden] * SCALE, None

        return lax.scan(step, h, xs)[0]

    def recurrent_matmul(w_h, h):
        def step(h, _):
            return (h @ w_h)[:, :hidden] * SCALE, None

        return lax.scan(step, h, None, length=time)[0]

    def gate_math(pre):
        def step(carry, _):
            h, c = carry
            h, c, _, _ = cells.lstm_update(pre + h[:, :1], c)
            return (h, c), None

        zeros = jnp.zeros((batch, hidden), pre.dtype)
        return lax.scan(step, (zeros, zeros), None, length=time)[0]

    def fresh(shape):
        return lambda value: jnp.full(shape, value, jnp.float32)

    pieces = [
        _jax_piece("x_t W_x + h W_h loop", both_matmuls, w_x, w_h, xs, h0),
        _jax_piece("h W_h loop", recurrent_matmul, w_h, h0),
        _jax_piece("gate math loop", gate_math, pre),
        _jax_piece("fresh hs", fresh((batch, time, hidden)), jnp.float32(1)),
    ]
    if not train:
        return pieces

    def backward_matmul(w_h_t, dpre):
        def step(dpre, _):
            return jnp.tile(dpre @ w_h_t, (1, 4)) * SCALE, None

        return lax.scan(step, dpre, None, length=time)[0]

    def backward_gate_math(saved, c_in, dh):
        def step(carry, _):
            dh, dc = carry
            i, f, g, o, tc = jnp.split(saved, 5, axis=-1)
            dpre, dc = lstm_gate_gradients(dh, dc, (i, f, g, o), c_in, tc)
            dpre = jnp.concatenate(dpre, axis=-1)
            return (dpre.reshape(batch, 4, hidden).sum(axis=1) * SCALE, dc), None

        return lax.scan(step, (dh, jnp.zeros_like(dh)), None, length=time)[0]

    return [
        *pieces,
        _jax_piece(
            "fresh residuals (5 hidden a step)", fresh((time, batch, 5 * hidden)), jnp.float32(1)
        ),
        _jax_piece("δpre W_hᵀ loop", backward_matmul, w_h.T, pre),
        _jax_piece("backward gate math loop", backward_gate_math, saved, c_in, h0),
        _jax_piece("fresh δxs", fresh((batch, time, features)), jnp.float32(1)),
    ]


def floor(
    medians: dict[str, float], peak_flops: float, hidden: int, batch: int, time: int, *, train: bool
) -> dict:
    """Seconds: the floor's terms, their sum and the sum without the gate math."""
    features = hidden
    projection = 2.0 * time * batch * features * 4 * hidden / peak_flops
    terms = {
        "recurrent matmuls": min(
            medians["x_t W_x + h W_h loop"], medians["h W_h loop"] + projection
        ),
        "gate math": medians["gate math loop"],
        "fresh hs": medians["fresh hs"],
    }
    if train:
        gradients = 2.0 * time * batch * 4 * hidden * (features + hidden + features)
        terms |= {
            "fresh residuals": medians["fresh residuals (5 hidden a step)"],
            "backward recurrent matmul": medians["δpre W_hᵀ loop"],
            "backward gate math": medians["backward gate math loop"],
            "weight and input gradients at peak": gradients / peak_flops,
            "fresh δxs": medians["fresh δxs"],
        }
    total = sum(terms.values())
    hidden_gates = total - terms["gate math"] - terms.get("backward gate math", 0.0)
    return {"terms_s": terms, "floor_s": total, "floor_without_gate_math_s": hidden_gates}


def run(shape: tuple[int, int, int], *, repeats: int, peak_n: int = 2048, log=print) -> dict:
    hidden, batch, time = shape
    env = records.environment(frameworks=("jax",))
    peak = bench.measure_peak(peak_n, repeats=repeats)
    log(f"peak {peak['gflops']:.1f} GFLOP/s")
    result = {
        "shape": {"hidden": hidden, "batch": batch, "time": time, "features": hidden},
        "repeats": repeats,
        "peak": peak,
        "environment": env,
        "passes": {},
    }
    for train in (False, True):
        contenders = [
            c
            for c in bench.lstm_contenders(hidden, batch, time, train=train)
            if c.name in CONTENDERS
        ]
        pieces = floor_pieces(hidden, batch, time, train=train)
        workload = bench.Workload(
            f"({hidden}, {batch}, {time})",
            "training step" if train else "forward",
            bench.lstm_flops(hidden, batch, time, train=train),
            contenders + pieces,
        )
        timed = bench.time_workload(workload, repeats=repeats)
        failed = [f"{r['name']}: {r['error']}" for r in timed if "error" in r]
        if any(r["name"] not in CONTENDERS for r in timed if "error" in r):
            raise RuntimeError("a floor piece failed: " + "; ".join(failed))
        medians = {r["name"]: r["median_s"] for r in timed if "median_s" in r}
        bound = floor(medians, peak["gflops"] * 1e9, hidden, batch, time, train=train)
        result["passes"][workload.group] = {"records": timed, **bound}
        log(f"{workload.group}: " + ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in medians.items()))
        log(
            f"  floor {bound['floor_s'] * 1e3:.1f} ms, "
            f"without the gate math {bound['floor_without_gate_math_s'] * 1e3:.1f} ms"
        )
    result["peak_after"] = bench.measure_peak(peak_n, repeats=repeats)
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def markdown(result: dict) -> str:
    s, env = result["shape"], result["environment"]
    lines = [
        f"# LSTM floor at (hidden, batch, time) = ({s['hidden']}, {s['batch']}, {s['time']}), float32",
        "",
        f"{env['date']}; {env['backend']}, {env['cpu_count']} CPUs; jax {env['versions']['jax']}, "
        f"flax {env['versions']['flax']}; "
        f"git {(env['git_commit'] or 'unknown')[:10]}; "
        f"matmul peak {result['peak']['gflops']:.0f} GFLOP/s before, {result['peak_after']['gflops']:.0f} after "
        f"(the floor uses the first). {result['repeats']} rounds, all rows of a pass interleaved; medians. "
        "Written by `python benchmarks/lstm_floor.py` (its docstring says what each piece is).",
    ]
    for name, p in result["passes"].items():
        lines += [
            "",
            f"## {name}",
            "",
            "| measured | median ms | min-max ms |",
            "| --- | ---: | ---: |",
        ]
        for r in p["records"]:
            if "median_s" in r:
                lines.append(
                    f"| {r['name']} | {_ms(r['median_s'])} | {_ms(r['min_s'])}-{_ms(r['max_s'])} |"
                )
            else:
                lines.append(f"| {r['name']} | error: {r['error']} | |")
        lines += ["", "| floor term | ms |", "| --- | ---: |"]
        lines += [f"| {k} | {_ms(v)} |" for k, v in p["terms_s"].items()]
        lines += [
            f"| **floor** | **{_ms(p['floor_s'])}** |",
            f"| floor without the gate math | {_ms(p['floor_without_gate_math_s'])} |",
            "",
        ]
        medians = {r["name"]: r["median_s"] for r in p["records"] if "median_s" in r}
        for contender in CONTENDERS:
            if contender in medians:
                lines.append(
                    f"- {contender}: {_ms(medians[contender])} ms = {medians[contender] / p['floor_s']:.2f}x "
                    f"the floor, {medians[contender] / p['floor_without_gate_math_s']:.2f}x the floor "
                    "without the gate math."
                )
        if bench.LSTM_FLAX in medians:
            lines.append(
                f"- The most any implementation timed this way could gain over Flax: "
                f"{medians[bench.LSTM_FLAX] / p['floor_s']:.2f}x (the floor), "
                f"{medians[bench.LSTM_FLAX] / p['floor_without_gate_math_s']:.2f}x (without the gate math)."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", default=",".join(map(str, DEFAULT_SHAPE)), help="hidden,batch,time"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        parser.error(
            f"expected --shape as three positive integers hidden,batch,time, got {args.shape!r}"
        )
    if args.repeats < 1:
        parser.error(f"expected --repeats >= 1, got {args.repeats}")
    result = run(shape, repeats=args.repeats, peak_n=args.peak_n)
    stem = "lstm_floor" if shape == DEFAULT_SHAPE else "lstm_floor-{}x{}x{}".format(*shape)
    paths = records.write_results(result, args.out, stem, render_markdown=markdown, render_png=None)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

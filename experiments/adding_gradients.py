"""The mechanism behind the adding study: how far back the loss's gradient reaches, RNN vs LSTM.

The seed's sentence: "the LSTM solves the simple RNN's long-range dependency problem". The adding
study (``lstm_vs_rnn_adding.py``) shows the outcome at T = 200: the LSTM learns the task, the
simple RNN stays at the baseline. This study measures why: for a batch of adding sequences it
computes the gradient of the loss with respect to each step's hidden state, ‖∂L/∂h_t‖ (and for the
LSTM its cell state, ‖∂L/∂c_t‖), for t = 1..T, against the distance T - t from the loss, which
reads only h_T. A simple RNN's ∂L/∂h_t is ∂L/∂h_T times T - t Jacobians diag(1 - h²) Uᵀ, so it
shrinks about exponentially with the distance; an LSTM's cell state is carried by ∂c_t/∂c_{t-1} =
diag(f_t), whose forget gates can learn to stay near 1. Each model is trained as in the adding
study (hidden 64, Adam lr 1e-3, clip norm 1.0, batch 50, 10,000 steps, seed 0) with a checkpoint
every ``--measure-every`` steps, and the gradients are measured at initialisation and at each
checkpoint on the test sequences; a line fitted to log ‖∂L/∂h_t‖ against the distance gives the
per-step factor (1: carried without loss).

    python experiments/adding_gradients.py          # T = 200, both models: ~15 min on 2 CPUs
    python experiments/adding_gradients.py --seq-len 50 --steps 2000 --measure-every 1000 --out /tmp/g
    python experiments/adding_gradients.py --no-train     # measure again the runs in WORKDIR

Writes OUT/adding_gradients.json (config, environment, every curve and fit), .md (the table) and
.png (the norms against distance on a log axis, a panel per model, a colour per training step);
the runs' folders (with their checkpoints) go to WORKDIR/<model>-T<T>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels import lstm_cell, report, rnn_cell
from jaxmodels.data.datasets import get_dataset
from jaxmodels.nn.cells import add_bias
from jaxmodels.nn.models import get_model
from jaxmodels.training.evaluate import restore_params
from jaxmodels.training.fit import TrainConfig, fit
from jaxmodels.training.rundir import read_rows
from jaxmodels.training.steps import create_train_state

STEM = "adding_gradients"
HERE = Path(__file__).resolve().parent
MODELS = {"rnn": ("rnn-regressor", "SimpleRNN_0"), "lstm": ("lstm-regressor", "LSTM_0")}
FLOOR = 1e-30  # norms below this (float32 underflows near 1e-38) are left out of the fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seq-len", type=int, default=200, help="sequence length T")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=["rnn", "lstm"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=10000, help="training steps per model")
    p.add_argument(
        "--measure-every", type=int, default=2500, help="measure at step 0 and every N steps"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=1000, help="test sequences: the measured batch")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--no-train",
        action="store_true",
        help="measure the checkpoints already in WORKDIR (a run of these flags) without training",
    )
    p.add_argument("--workdir", type=Path, default=Path("runs") / STEM)
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    args = p.parse_args(argv)
    if args.steps % args.measure_every:
        p.error(f"--steps {args.steps} is not a multiple of --measure-every {args.measure_every}")
    return args


# ---------------------------------------------------------------------------------------------
# The measurement


def state_gradients(
    cell: str, layer: dict, head: dict, xs, ys, *, activation="tanh"
) -> tuple[dict[str, jax.Array], jax.Array]:
    """∂ℓ_b/∂h_t (and for ``cell`` "lstm" ∂ℓ_b/∂c_t) for every sequence b and step t, where ℓ_b =
    (h_T W + b - y_b)² is the squared error of the dense ``head`` ({"kernel", "bias"}) on the last
    hidden state. The recurrence is the library's cell (``rnn_cell`` with ``activation``, or
    ``lstm_cell``) with ``layer``'s params in a ``lax.scan`` from a zero state, with a zero added to
    each step's new state: the gradient with respect to that addition is the gradient with respect
    to the state, through every later step (for the LSTM, h_t and c_t each with the other held).

    xs [batch, T, features], ys [batch] or [batch, 1]. Returns ({"h": [batch, T, hidden], and "c"
    for the LSTM}, the predictions [batch])."""
    xs = jnp.swapaxes(jnp.asarray(xs, jnp.float32), 0, 1)  # time-major [T, batch, features]
    ys = jnp.asarray(ys, jnp.float32).reshape(-1)
    hidden = layer["w_h"].shape[0]
    zeros = jnp.zeros((xs.shape[0], xs.shape[1], hidden), jnp.float32)
    parts = ("h", "c") if cell == "lstm" else ("h",)

    def predict(perturb: dict) -> jax.Array:
        def step(carry, inputs):
            x, add = inputs
            if cell == "lstm":
                (h, c), _ = lstm_cell(layer, carry, x)
                return (h + add["h"], c + add["c"]), None
            h, _ = rnn_cell(layer, carry, x, activation=activation)
            return h + add["h"], None

        state = zeros[0] if cell == "rnn" else (zeros[0], zeros[0])
        final, _ = jax.lax.scan(step, state, (xs, perturb))
        h_last = final[0] if cell == "lstm" else final
        return add_bias(h_last @ head["kernel"], head["bias"]).reshape(-1)

    def loss(perturb):  # the sum of per-sequence losses: its gradient is each sequence's own
        preds = predict(perturb)
        return jnp.sum(jnp.square(preds - ys)), preds

    grads, preds = jax.grad(loss, has_aux=True)({k: zeros for k in parts})
    return {k: jnp.swapaxes(g, 0, 1) for k, g in grads.items()}, preds


def gradient_norms(cell: str, params: dict, xs, ys) -> tuple[dict[str, np.ndarray], float]:
    """The mean over the batch of ‖∂ℓ_b/∂h_t‖ (and ‖∂ℓ_b/∂c_t‖), indexed by the distance T - t
    (index 0: the last step), for a regressor's ``params`` (``MODELS``' layout); and the batch's
    MSE."""
    layer, head = params[MODELS[cell][1]]["layer_0"], params["Dense_0"]
    grads, preds = jax.jit(functools.partial(state_gradients, cell))(layer, head, xs, ys)
    # the norms in float64: squared, float32 gradients of 1e-20 would underflow to 0
    norm = lambda g: np.linalg.norm(np.asarray(g, np.float64), axis=-1).mean(axis=0)[::-1]
    norms = {k: norm(grads[k]) for k in ("h", "c") if k in grads}
    mse = float(np.mean((np.asarray(preds) - np.asarray(ys).reshape(-1)) ** 2))
    return norms, mse


def decay_fit(norms: np.ndarray, floor: float = FLOOR) -> dict:
    """A least-squares line through log ‖g‖ against the distance, over the distances whose norm is
    above ``floor``: the per-step factor exp(slope) (1: no decay), and the distance over which
    the norm falls tenfold at that rate (inf when it does not fall)."""
    norms = np.asarray(norms, np.float64)
    distance = np.arange(len(norms))
    used = np.isfinite(norms) & (norms > floor)
    slope = float(np.polyfit(distance[used], np.log(norms[used]), 1)[0])
    return {
        "slope_per_step": slope,
        "factor_per_step": math.exp(slope),
        "steps_per_tenfold": math.log(10) / -slope if slope < 0 else math.inf,
        "fitted_distances": [int(distance[used][0]), int(distance[used][-1])],
    }


# ---------------------------------------------------------------------------------------------
# The study


def train_and_measure(args: argparse.Namespace, key: str, ds) -> list[dict]:
    """Train ``key``'s model as the adding study does, with checkpoints every ``measure_every``
    steps; the gradient norms at initialisation and at each checkpoint."""
    model = get_model(MODELS[key][0], hidden_size=args.hidden)
    steps_per_epoch = len(ds.x_train) // args.batch_size
    cfg = TrainConfig(
        epochs=math.ceil(args.steps / steps_per_epoch),
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        schedule="constant",
        clip_norm=args.clip_norm,
        seed=args.seed,
        log_every=steps_per_epoch,
        progress=False,
        plot=False,
        checkpoint_every=args.measure_every,
        keep=args.steps // args.measure_every + 1,
    )
    workdir = args.workdir / f"{key}-T{args.seq_len}-seed{args.seed}"
    init = create_train_state(model, optax.identity(), ds.x_train[:1], args.seed).params  # fit's
    if not args.no_train:
        with contextlib.redirect_stdout(io.StringIO()):
            fit(model, ds, cfg, workdir, overwrite=True)
    train_s = [r for r in read_rows(workdir) if r["kind"] == "eval"][-1]["time_s"]
    records = []
    for step in range(0, args.steps + 1, args.measure_every):
        params = init
        if step:
            params = restore_params(model, ds.x_test[:1], workdir, step=step)[1].params
        norms, mse = gradient_norms(key, params, ds.x_test, ds.y_test)
        for part, curve in norms.items():
            records.append(
                {
                    "model": key,
                    "state": part,
                    "step": step,
                    "test_mse": mse,
                    "norms": curve.tolist(),
                    **decay_fit(curve),
                    "train_s": train_s,
                    "workdir": str(workdir),
                }
            )
    return records


def at(distance: int):
    """A summary cell: the norm at ``distance`` from the loss."""
    return lambda run: run["norms"][min(distance, len(run["norms"]) - 1)]


SUMMARY = {
    "test_mse": report.first("test_mse"),
    "norm_d0": report.first(at(0)),
    "norm_d50": report.first(at(50)),
    "norm_dmax": report.first(lambda run: run["norms"][-1]),
    "factor_per_step": report.first("factor_per_step"),
    "steps_per_tenfold": report.first("steps_per_tenfold"),
    "fitted_distances": report.first("fitted_distances"),
}


def setup(result: dict) -> list[str]:
    c = result["config"]
    return [
        f"Adding problem, T = {c['seq_len']}: hidden {c['hidden']}, {c['steps']} steps of batch "
        f"{c['batch_size']}, Adam lr {c['lr']} (constant), clip norm {c['clip_norm']}, seed "
        f"{c['seed']}; {c['train_size']} training sequences (data seed {c['data_seed']}). "
        f"Gradients on the {c['test_size']} test sequences: the mean over them of ‖∂ℓ/∂h_t‖ (‖∂ℓ/∂c_t‖), "
        "ℓ a sequence's squared error, at distance d = T - t from the loss. Factor per step: "
        f"exp of the slope of a line fitted to log-norm against d, over the d whose norm is above "
        f"{FLOOR:g}; baseline test MSE (predict 1) {result['baseline_mse']:.4f}.",
        "Training time (fit's clock): "
        + ", ".join(f"{m} {s:.0f} s" for m, s in result["train_s"].items())
        + (
            "; this result measured those runs' checkpoints again (`--no-train`)."
            if c["no_train"]
            else "."
        ),
    ]


def plotted(norms: list[float]) -> list[tuple[int, float]]:
    """(distance, norm) for the norms a log axis can show: above ``FLOOR`` (∂L/∂c_T is 0: the loss
    reads h_T only)."""
    return [(d, n) for d, n in enumerate(norms) if n > FLOOR]


def stage(step: int) -> str:
    return "init" if step == 0 else f"step {step}"


def make_report(steps: list[int], seq_len: int) -> report.Report:
    """The table, and the plot: a panel per model, a colour per measured step (light to dark)."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    shade = lambda i: 0.9 - 0.9 * i / max(len(steps) - 1, 1)
    colors = {s: matplotlib.colors.to_hex(cmap(shade(i))) for i, s in enumerate(steps)}
    return report.Report(
        title=f"Gradient of the loss against distance, adding problem at T = {seq_len}",
        setup=setup,
        columns=[
            report.Column("model", "{model}"),
            report.Column("state", lambda r: f"∂L/∂{r['state']}_t"),
            report.Column("step", "{step}", right=True),
            report.Column("test MSE", "{test_mse:.4f}", right=True),
            report.Column("norm at d = 0", "{norm_d0:.2e}", right=True),
            report.Column("d = 50", "{norm_d50:.2e}", right=True),
            report.Column(f"d = {seq_len - 1}", "{norm_dmax:.2e}", right=True),
            report.Column("factor per step", "{factor_per_step:.4f}", right=True),
            report.Column("steps per tenfold", "{steps_per_tenfold:.0f}", right=True),
            report.Column("fitted d", lambda r: "{}-{}".format(*r["fitted_distances"])),
        ],
        curves=report.Curves(
            curve=lambda run: tuple(zip(*plotted(run["norms"]))),
            panel_by="model",
            color_by="step",
            colors=colors,
            dash_by="state",  # c: solid, h: dotted
            label="{step_label}, ∂L/∂{state}",
            style={"alpha": 0.9},
            axes={"yscale": "log"},
            grid="both",
            xlabel="distance from the loss, T - t (steps)",
            ylabel="mean ‖∂ℓ/∂state_t‖",
            title="{panel}",
            size=(5.5, 4.2),
        ),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = list(range(0, args.steps + 1, args.measure_every))
    study = report.Study(STEM, vars(args) | {"floor": FLOOR}, make_report(steps, args.seq_len))
    ds = get_dataset(
        "adding",
        seq_len=args.seq_len,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.data_seed,
    )
    runs = []
    for key in args.models:
        measured = train_and_measure(args, key, ds)
        runs += [r | {"step_label": stage(r["step"])} for r in measured]
        for r in measured:
            print(
                f"{key} ∂L/∂{r['state']} at {stage(r['step'])}: factor per step "
                f"{r['factor_per_step']:.4f}, norm {r['norms'][0]:.2e} at d = 0, "
                f"{r['norms'][-1]:.2e} at d = {args.seq_len - 1}; test MSE {r['test_mse']:.4f}",
                flush=True,
            )
    result, _ = study.finish(
        args.out,
        baseline_mse=float(np.mean((ds.y_test - 1.0) ** 2)),
        train_s={r["model"]: r["train_s"] for r in runs},
        summary=report.summarise(runs, ("model", "state", "step"), SUMMARY),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()

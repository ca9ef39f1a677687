"""Why `notebooks/bring_your_own_model.ipynb`'s PC run collapses: a measurement.

    python benchmarks/experiments/collapse_byom.py [--solver gd|backtracking] [--seeds 0,1,2]
        [--epochs 20] [--out benchmarks/results/collapse_byom.json]

The notebook's model (equinox MLP 64-128-128-10 with layer norm, GELU, cross-entropy output
node), data (UCI digits, batch 64), optimizer (AdamW 1e-3) and learning rule
(`pc.Equilibrium(solver)`), seed `s` for both the initial weights and the batch order. After
every epoch, on a fixed probe batch (the first 64 training images), it logs:

- `epoch`: 0 is the initial model (no training step: `rel_*`, `rose_frac` are NaN);
- `test`: test accuracy; `bp_cos`: per layer, the cosine between PC's weight gradient (the
  training rule's relaxation) and backprop's gradient of the cross-entropy;
- `rel`: the equilibrium certificate `relative_grad_norm` of the training solver;
- `rose`: whether inference ended at a higher energy than it started (`energy_rose`);
- `lam`: the largest eigenvalue of the state Hessian of the energy at the feedforward pass
  (power iteration): gradient descent with step size `eta` is stable only while
  `eta * lam < 2`; `lam_nodes`: the same for each node's block alone (the others fixed);
  `sd0`: the mean per-sample standard deviation of `hidden0`, which the layer norm divides by
  (its Jacobian, and so `hidden0`'s curvature, scales as `1 / sd0`);
- `gap`: `pc.equilibrium_gap` of the training solver's states against a `pc.Backtracking`
  reference (relative error of dF/dtheta);
- `wnorm`: per-layer weight norms;

and, over the epoch's training steps, the fraction whose energy rose (`rose_frac`) and the
median and largest certificate (`rel_med`, `rel_max`). Backprop (same model, optimizer and
batches) is the baseline (`bp_test`). Runtime: about a minute per solver on 2 CPU cores.

Measured (`benchmarks/results/collapse_byom.json`, seeds 0-2, 20 epochs): the state Hessian's
largest eigenvalue is 15-16 at initialisation, almost all of it `hidden0`'s block (the layer
norm divides by `hidden0`'s spread, 0.3), and 30-32 after one epoch (spread 0.22), past
`2 / 0.1 = 20`. From the second epoch `GradientDescent(8, step_size=0.1)` raised the energy
in 45-73% of the steps (nearly all later), its certificate's median went from 0.7 to 20-35
(100-2,800 in epochs 15-20), the second layer's PC gradient lost its alignment with
backprop's (cosine 0.94-0.95 at initialisation; from epoch 5 on median 0.06, below 0.15 in 75%
of the epochs, while the output layer's stayed 0.98-1.0), that layer's weight norm grew from
6.6 to 19-51 (backprop's run: 9), and test accuracy peaked at 96.4-97.5% and ended at 87.7%,
90.5% and 70.8% (largest drop from the running best: 9, 26 and 46 points).
`Backtracking(8, step_size=0.1)` never raised the energy (the eigenvalue grows to 180-320 by
epoch 20, and the accepted step shrinks with it), the second layer's cosine stayed 0.2-0.7 and
its weight norm 9.0-9.4, and the seeds ended at 98.3%, 97.8% and 97.5% (backprop 97.8%,
98.1%, 97.8%; no drop of more than 1.4 points below the running best). Neither solver is near
equilibrium in 8 steps (certificate 2-5, learning-signal gap 0.9-2.4 against a 400-step
backtracking reference): what the collapse needs is an inference that does not blow up,
not a converged one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc
from pcjax import datasets

RESULTS = Path(__file__).resolve().parents[1] / "results"
BATCH = 64


class Classifier(eqx.Module):
    """The notebook's model, verbatim."""

    layers: list[eqx.nn.Linear]
    norm: eqx.nn.LayerNorm

    def __init__(self, key, sizes=(64, 128, 128, 10)):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes, sizes[1:], keys)]
        self.norm = eqx.nn.LayerNorm(sizes[1])

    def __call__(self, image):
        h = pc.node("hidden0", self.layers[0](image.ravel()))
        h = pc.node("hidden1", self.layers[1](jax.nn.gelu(self.norm(h))))
        return pc.node("logits", self.layers[2](jax.nn.gelu(h)), energy=pc.cross_entropy)


SOLVERS = {
    "gd": lambda: pc.GradientDescent(8, step_size=0.1),
    "backtracking": lambda: pc.Backtracking(8, step_size=0.1),
}


def weight_grads(grads) -> list[jax.Array]:
    return [layer.weight for layer in grads.layers]


def cosine(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def largest_eigenvalue(model, start, x, observed, names, iterations: int = 40):
    """Power iteration on the Hessian of the energy in the states `names` (the others fixed
    at `start`), from a random vector (a constant one lies in layer norm's null space)."""

    def field(free):
        return jax.grad(lambda f: pc.energy(pc.nn.call, model, {**start, **f}, x, observed))(free)

    free = {k: start[k] for k in names}
    keys = jax.random.split(jax.random.PRNGKey(0), len(names))
    v0 = {k: jax.random.normal(key, free[k].shape) for k, key in zip(names, keys)}

    def power(v, _):
        w = jax.jvp(field, (free,), (v,))[1]
        norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(w)))
        return jax.tree.map(lambda leaf: leaf / norm, w), norm

    return jax.lax.scan(power, v0, None, length=iterations)[1][-1]


def make_probe(solver, reference):
    """One jitted function: the diagnostics of one model on one batch."""

    @eqx.filter_jit
    def probe(model, x, y):
        observed = {"logits": y}
        start = pc.forward_init(pc.nn.call, model, x)
        del start["logits"]
        states, info = pc.infer(pc.nn.call, model, start, x, observed, solver=solver)
        pc_grads = pc.param_grads(pc.nn.call, model, states, x, observed)
        bp_grads = eqx.filter_grad(lambda m: -jnp.sum(y * jax.nn.log_softmax(jax.vmap(m)(x), -1)))(
            model
        )
        gap = pc.equilibrium_gap(pc.nn.call, model, states, x, observed, reference=reference)

        return {
            "rel": info.relative_grad_norm,
            "rose": info.energy_rose,
            "lam": largest_eigenvalue(model, start, x, observed, list(start)),
            "lam_nodes": {k: largest_eigenvalue(model, start, x, observed, [k]) for k in start},
            "sd0": jnp.mean(jnp.std(start["hidden0"], -1)),
            "gap": gap.gap,
            "pc_w": weight_grads(pc_grads),
            "bp_w": weight_grads(bp_grads),
        }

    return probe


def run(solver_name: str, seeds: list[int], epochs: int) -> dict:
    data = datasets.load_digits()
    x_train, x_test = data.x_train, data.x_test
    y_train = np.eye(10, dtype=np.float32)[data.y_train]
    optimizer = optax.adamw(1e-3)
    solver = SOLVERS[solver_name]()
    step = eqx.filter_jit(pc.make_train_step(pc.nn.call, pc.Equilibrium(solver), optimizer))
    probe = make_probe(solver, pc.Backtracking(400, step_size=0.1))

    @eqx.filter_jit
    def bp_step(model, opt_state, x, y):
        def loss(m):
            return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(jax.vmap(m)(x), -1), -1))

        grads = eqx.filter_grad(loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    @eqx.filter_jit
    def accuracy(model, x, labels):
        return jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == labels)

    def summary(epoch, model, bp, d, rels, roses) -> dict:
        return {
            "epoch": epoch,
            "test": round(float(accuracy(model, x_test, data.y_test)), 4),
            "bp_test": round(float(accuracy(bp, x_test, data.y_test)), 4),
            "rel_med": round(float(np.median(rels)), 3),
            "rel_max": round(float(np.max(rels)), 3),
            "rose_frac": round(float(np.mean(roses)), 3),
            "rel": round(float(d["rel"]), 3),
            "rose": bool(d["rose"]),
            "lam": round(float(d["lam"]), 2),
            "lam_nodes": {k: round(float(v), 2) for k, v in d["lam_nodes"].items()},
            "sd0": round(float(d["sd0"]), 3),
            "gap": round(float(d["gap"]), 3),
            "bp_cos": [round(cosine(a, b), 3) for a, b in zip(d["pc_w"], d["bp_w"])],
            "wnorm": [round(float(jnp.linalg.norm(w.weight)), 2) for w in model.layers],
        }

    px, py = x_train[:BATCH], y_train[:BATCH]
    out = {}
    for seed in seeds:
        model = bp = Classifier(jax.random.PRNGKey(seed))
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        bp_state = optimizer.init(eqx.filter(bp, eqx.is_inexact_array))
        rng = np.random.default_rng(seed)
        log = []
        rels, roses = [np.nan], [np.nan]  # epoch 0: the initial model, no training step yet
        for epoch in range(epochs + 1):
            if epoch:
                order = rng.permutation(len(x_train))
                rels, roses = [], []
                for start in range(0, len(order) - BATCH + 1, BATCH):
                    idx = order[start : start + BATCH]
                    model, opt_state, info = step(
                        model, opt_state, x_train[idx], {"logits": y_train[idx]}
                    )
                    bp, bp_state = bp_step(bp, bp_state, x_train[idx], y_train[idx])
                    rels.append(float(info.relative_grad_norm))
                    roses.append(bool(info.energy_rose))
            log.append(summary(epoch, model, bp, probe(model, px, py), rels, roses))
            print(solver_name, seed, log[-1], flush=True)
        out[str(seed)] = log
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="gd,backtracking", help="gd, backtracking or both")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "collapse_byom.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    results = {name: run(name, seeds, args.epochs) for name in args.solver.split(",")}
    results["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", args.out, f"({results['seconds']} s)")


if __name__ == "__main__":
    main()

"""Training machinery of `uncertainty_aware_backprop.ipynb`: one tanh MLP, seven ways to train it.

Every method trains the same network (input -> h1 -> h2 -> y, tanh, pre-activations tagged as
PC nodes) with Adam, the same number of epochs and batch size; a whole training run is one
`jax.jit`-compiled function, `jax.vmap`-ed over runs (seeds, or learning rates of a grid).

Methods (`METHODS`):

- `bp_mse`: backprop of the mean squared error 1/2 |y - mu(x)|^2.
- `bp_ce`: backprop of the softmax cross-entropy (classification only, a reference).
- `bp_nll_node`: backprop of the Gaussian negative log-likelihood with a learned precision per
  output dimension, 1/2 sum p_j e_j^2 - 1/2 sum log p_j (the control for `pc_node`: learned
  precision without PC inference).
- `bp_nll_input`: backprop of the heteroscedastic Gaussian NLL, the precision p(x) computed by a
  head of the network (the control for `pc_input`). This is also what reverse PC with fixed
  predictions computes (`pcjax.fixed_predictions`, checked in the notebook).
- `pc_fixed`: standard PC (inference to equilibrium, then the local learning rule), unit
  precisions on every node.
- `pc_node`: standard PC with learned `pcjax.DiagonalPrecision`s on the output and both hidden
  nodes.
- `pc_input`: standard PC whose output node has the input-dependent precision p(x),
  `pcjax.node("y", mu, precision=p)` (hidden nodes: unit precision).

The precision head reads the last hidden layer: log p = LOG_P_MAX * tanh((tanh(h2) V + c) /
LOG_P_MAX), bounded so that |log p| <= LOG_P_MAX; the learned per-node precisions are projected
onto the same interval after every step (the same bound for backprop and PC). The bound keeps
PC's inference stable: the Hessian of the energy in h2 grows with the output precision, and
gradient descent with a fixed step diverges or oscillates above it (`equilibrium_gap` measures).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import pcjax as pc

METHODS = ("bp_mse", "bp_ce", "bp_nll_node", "bp_nll_input", "pc_fixed", "pc_node", "pc_input")
LOG_P_MAX = 2.0  # precisions within [e^-2, e^2] = [0.14, 7.4]


class Config(NamedTuple):
    hidden: int = 64
    epochs: int = 30
    batch: int = 50
    inference_steps: int = 100  # standard PC: gradient descent on the hidden states
    inference_step_size: float = 0.1
    precision_per_sample: bool = False  # p(x): one value per sample (classification), or per dim


def init_params(key, d_in, d_out, cfg: Config, method: str):
    keys = jax.random.split(key, 4)
    sizes = [d_in, cfg.hidden, cfg.hidden, d_out]
    layers = [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys[:3], sizes[:-1], sizes[1:])
    ]
    params = {"layers": layers}
    if method in ("bp_nll_input", "pc_input"):
        d_p = 1 if cfg.precision_per_sample else d_out
        params["head"] = (jnp.zeros((cfg.hidden, d_p)), jnp.zeros(d_p))  # starts at p = 1
    if method == "bp_nll_node":
        params["log_p"] = jnp.zeros(d_out)
    if method == "pc_node":
        params["precision"] = {
            "h1": pc.DiagonalPrecision(jnp.ones(cfg.hidden)),
            "h2": pc.DiagonalPrecision(jnp.ones(cfg.hidden)),
            "y": pc.DiagonalPrecision(jnp.ones(d_out)),
        }
    return params


def log_precision(params, h):
    """The head: the input-dependent log precision, bounded to [-LOG_P_MAX, LOG_P_MAX]."""
    v, c = params["head"]
    return LOG_P_MAX * jnp.tanh((h @ v + c) / LOG_P_MAX)


def network(params, x):
    """The tagged network; with a "head" its output node carries the precision p(x)."""
    (w1, b1), (w2, b2), (w3, b3) = params["layers"]
    h = jnp.tanh(pc.node("h1", x @ w1 + b1))
    h = jnp.tanh(pc.node("h2", h @ w2 + b2))
    if "head" in params:
        return pc.node("y", h @ w3 + b3, precision=jnp.exp(log_precision(params, h)))
    return pc.node("y", h @ w3 + b3)


def forward(params, x):
    """Plain feedforward pass (the tags are the identity): (mean, log precision or None)."""
    (w1, b1), (w2, b2), (w3, b3) = params["layers"]
    h = jnp.tanh(jnp.tanh(x @ w1 + b1) @ w2 + b2)
    log_p = log_precision(params, h) if "head" in params else None
    return h @ w3 + b3, log_p


def bp_loss(method):
    def loss(params, x, y):
        mu, log_p = forward(params, x)
        e = y - mu
        if method == "bp_mse":
            per_sample = 0.5 * jnp.sum(e**2, -1)
        elif method == "bp_ce":
            per_sample = -jnp.sum(y * jax.nn.log_softmax(mu), -1)
        elif method == "bp_nll_node":
            lp = params["log_p"]
            per_sample = 0.5 * jnp.sum(jnp.exp(lp) * e**2 - lp, -1)
        elif method == "bp_nll_input":
            per_sample = 0.5 * jnp.sum(jnp.exp(log_p) * e**2 - jnp.broadcast_to(log_p, e.shape), -1)
        else:
            raise ValueError(method)
        return jnp.mean(per_sample)

    return loss


def project(params):
    """Learned per-node log precisions back into [-LOG_P_MAX, LOG_P_MAX] (the head's bound)."""
    clip = lambda a: jnp.clip(a, -LOG_P_MAX, LOG_P_MAX)  # noqa: E731
    if "log_p" in params:
        params = {**params, "log_p": clip(params["log_p"])}
    if "precision" in params:
        precision = {
            name: eqx.tree_at(lambda m: m.log_values, module, clip(module.log_values))
            for name, module in params["precision"].items()
        }
        params = {**params, "precision": precision}
    return params


def make_step(method, cfg: Config, optimizer):
    """`step(params, opt_state, x, y) -> (params, opt_state, diverged)` for one method."""
    if method.startswith("bp_"):
        grad = jax.grad(bp_loss(method))

        def bp_step(params, opt_state, x, y):
            updates, opt_state = optimizer.update(grad(params, x, y), opt_state, params)
            return project(optax.apply_updates(params, updates)), opt_state, jnp.array(False)

        return bp_step
    rule = pc.Equilibrium(
        pc.GradientDescent(cfg.inference_steps, step_size=cfg.inference_step_size)
    )
    precision = (lambda p: p["precision"]) if method == "pc_node" else None
    train_step = pc.make_train_step(network, rule, optimizer, precision=precision)

    def pc_step(params, opt_state, x, y):
        params, opt_state, info = train_step(params, opt_state, x, {"y": y})
        return project(params), opt_state, info.diverged

    return pc_step


def make_trainer(method, cfg: Config, d_in, d_out, n_train):
    """`train(keys, lrs, x, y) -> (params, diverged)`: one run per row of `keys` / `lrs` /
    `x` / `y` (x: (runs, n, d_in), y: (runs, n, d_out)), Adam(lr), `cfg.epochs` epochs of
    shuffled mini-batches. One jitted, vmapped epoch (a `lax.scan` over the batches)."""
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    step = make_step(method, cfg, optimizer)
    steps_per_epoch = n_train // cfg.batch

    def init(key, lr):
        params = init_params(key, d_in, d_out, cfg, method)
        opt_state = optimizer.init(params)
        opt_state.hyperparams["learning_rate"] = lr
        return params, opt_state, jnp.array(False)

    def epoch(carry, x, y, order):
        def batch_step(carry, idx):
            params, opt_state, diverged = carry
            params, opt_state, bad = step(params, opt_state, x[idx], y[idx])
            return (params, opt_state, diverged | bad), None

        return jax.lax.scan(batch_step, carry, order)[0]

    init, epoch = jax.jit(jax.vmap(init)), jax.jit(jax.vmap(epoch))

    def train(keys, lrs, x, y):
        carry = init(keys, lrs)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(keys))[:, -1].astype(np.int64))
        for _ in range(cfg.epochs):
            order = np.stack([rng.permutation(x.shape[1]) for _ in range(x.shape[0])])
            order = order[:, : steps_per_epoch * cfg.batch].reshape(x.shape[0], steps_per_epoch, -1)
            carry = epoch(carry, x, y, order)
        params, _, diverged = carry
        return params, diverged

    return train


# Built once: a jit of a fresh `jax.vmap(forward)` on every call would compile every call.
_batched_forward = jax.jit(jax.vmap(forward))


def predict(params, x):
    """Feedforward predictions of a batch of runs: (runs, n, d_out) means, log precisions."""
    return _batched_forward(params, x)


def equilibrium_gap(method, params, x, y, cfg: Config, reference_steps=20_000):
    """How far the training relaxation (`cfg`'s gradient descent) leaves the PC parameter
    gradient from the one at equilibrium: |g - g*| / |g*|, with g* after `reference_steps` steps
    of a 10x smaller step size (one run's `params`, one batch)."""
    trained = _relaxed_param_grads(params, x, y, cfg.inference_steps, cfg.inference_step_size)
    reference = _relaxed_param_grads(params, x, y, reference_steps, cfg.inference_step_size / 10)
    return float(jnp.linalg.norm(trained - reference) / jnp.linalg.norm(reference))


@eqx.filter_jit  # one compile per parameter structure and step count, shared across calls
def _relaxed_param_grads(params, x, y, steps: int, step_size: float) -> jax.Array:
    """The flattened PC parameter gradient after `steps` gradient-descent state updates."""
    precision = params.get("precision")
    start = pc.forward_init(network, params, x)
    free = {k: v for k, v in start.items() if k != "y"}
    solver = pc.GradientDescent(steps, step_size=step_size)
    states, _ = pc.infer(network, params, free, x, {"y": y}, solver=solver, precision=precision)
    g = pc.param_grads(network, params, states, x, {"y": y}, precision=precision)
    return jax.flatten_util.ravel_pytree(g)[0]

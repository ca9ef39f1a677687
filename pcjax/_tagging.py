r"""Tagging intermediate values of a JAX function as predictive-coding nodes.

A forward function becomes a PC network by wrapping the values that should be nodes in
`pcjax.node(name, value)`. The tag is a JAX primitive (`pcjax._harvest`): outside pcjax it is
the identity under every transformation, and inside pcjax the function is traced to a jaxpr and
evaluated by an interpreter that records each tagged value (the node's prediction $\mu$,
computed from whatever its parents returned) and hands back the node's own state $x$ instead, so
one call yields every node's prediction from its parents' *states*. Because the tag is part of
the traced program, it survives `jax.vmap`, `lax.scan`, `jax.jit` (whatever the state of its
cache) and `jax.checkpoint` inside the function.

[pcjax.dense][] marks a dense layer for the Kronecker and diagonal Fisher statistics
(`pcjax._dense`), which find such layers from the same traced program.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._dense import mark_dense
from ._harvest import harvest, mark_state_dtype, tag, tagged_nodes

Array = jax.Array
Nodes = dict[str, Array]


NO_NODE = (
    "pcjax: the function tagged no node; wrap intermediate values in "
    "pcjax.node(name, value) to make them PC nodes."
)


def node(
    name: str,
    value: Array,
    *,
    energy: Callable[[Array, Array], Array] | None = None,
    precision: Array | None = None,
) -> Array:
    r"""Tag `value` as the prediction of the PC node `name`.

    Called outside pcjax this returns `value` unchanged (under `jit`, `grad`, `vmap`, ...), so a
    tagged function is still an ordinary JAX function. Inside pcjax (`energy`, `infer`,
    `forward_init`, ...) `value` is recorded as the node's prediction $\mu_{\text{name}}$ and
    the node's current state $x_{\text{name}}$ is returned in its place, so that downstream
    computation (the children of the node) is driven by the state, not by the prediction.

    **Arguments:**

    - `name`: a name unique within one call of the function.
    - `value`: one array, the prediction of the node computed from its parents.
    - `energy`: the node's energy term as a function `(state, prediction) -> scalar` (summed
      over the batch), replacing the default Gaussian $\tfrac12 e^\top P e$; e.g.
      [pcjax.cross_entropy][] for a label node whose prediction is logits. Such nodes take no
      precision and no natural gradient.
    - `precision`: the node's precision computed by the function itself, an array that
      broadcasts to `value` (e.g. per sample and feature, or `(batch, 1)` per sample), which
      must be positive (e.g. `jnp.exp(log_p)` or `jax.nn.softplus(s)` of a network output).
      The node's energy is then the heteroscedastic Gaussian
      $\tfrac12 \sum p\,(x - \mu)^2 - \tfrac12 \sum \log p$ (summed over all entries), so
      the parameters that compute $p$ learn from the same energy as the rest (attention-like,
      input-dependent precision). Such a node takes no `precision=` argument elsewhere; the
      natural gradient, [pcjax.preconditioned][] and nudging it with [pcjax.Nudged][] refuse it.
      With [pcjax.fixed_predictions][], $p$ is frozen at the feedforward pass like $\mu$.

    **Returns:** `value`, or the node's state when pcjax substitutes states.

    Tags may sit inside transformations of the function's own:

    - `jax.vmap` / `eqx.filter_vmap`: the node's state is batched, with the vmapped axis first
      (nested vmaps: outermost first); e.g. per-sample equinox layers vmapped over a batch.
      This holds also for a value that does not depend on the vmapped input (a prior mean
      `pcjax.node("z", params["prior"])`): it is broadcast, so every sample has its own state.
    - `lax.scan`: the state is stacked along a new leading axis of the scan's length, one state
      per step (per time step of an RNN, per layer of a scan over layers); the prediction at
      step $t$ is computed from the body's inputs at step $t$, i.e. from the states of step
      $t - 1$ when they are carried.
    - `jax.jit`, `eqx.filter_jit`, `jax.checkpoint` / `eqx.filter_checkpoint`: transparent.
    - a node inside `lax.while_loop`, `lax.cond` / `switch`, a `custom_jvp` / `custom_vjp`
      function or `shard_map` raises a `ValueError` naming the node and the construct.

    **Raises:** nothing when called; pcjax's functions raise a `ValueError` that names the node
    for a name tagged twice in one call, a node in an unsupported construct (above), or a
    state whose shape or dtype differs from the node's value.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> pc.node("h", jnp.ones(2))  # outside pcjax: the value itself
    Array([1., 1.], dtype=float32)
    >>> states = pc.forward_init(fn, params, x)  # inside: each node is recorded
    >>> {name: state.shape for name, state in states.items()}
    {'h': (2, 4), 'y': (2, 2)}

    ```
    """
    return tag(name, value, energy=energy, precision=precision)


def dense(inputs: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""A dense layer `inputs @ weight + bias` that pcjax's Fisher statistics must find.

    It computes exactly `inputs @ weight (+ bias)`. The `"diagonal"` and `"kronecker"` modes
    of [pcjax.natural_gradient][] find dense layers tagged as nodes by themselves (`h @ w + b`,
    `eqx.nn.Linear`, under `jax.vmap` and in `lax.scan` bodies, see [pcjax.fisher_mask][]);
    [pcjax.dense][] additionally makes it an error if this layer is not found: its output is not
    tagged directly, `pcjax.node(name, pcjax.dense(h, w, b))`, or its weight is not a
    parameter leaf itself (a transformed copy). Its Fisher is $\mathbb{E}[h h^\top] \otimes P$.

    **Arguments:**

    - `inputs`: the layer's input, shape `(..., in)`.
    - `weight`: the weight matrix, shape `(in, out)`: a parameter leaf.
    - `bias`: the bias, shape `(out,)`; default None (no bias).

    **Returns:** `inputs @ weight + bias`, shape `(..., out)`.

    **Raises:** `ValueError` naming both shapes if `weight` is not `(in, out)` with `in` the
    last axis of `inputs`; [pcjax.fisher_statistics][] raises one if the layer is not found.

    **Example:**

    ```pycon
    >>> pc.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4))
    Array([[3., 3., 3., 3.],
           [3., 3., 3., 3.]], dtype=float32)

    ```
    """
    if jnp.ndim(weight) != 2 or jnp.shape(inputs)[-1:] != jnp.shape(weight)[:1]:
        raise ValueError(
            f"pcjax.dense: `inputs` of shape {jnp.shape(inputs)} and `weight` of shape "
            f"{jnp.shape(weight)} do not fit: weight must be (in, out) with in = inputs' last axis."
        )
    if bias is not None and jnp.shape(bias) != jnp.shape(weight)[1:]:
        raise ValueError(
            f"pcjax.dense: `bias` has shape {jnp.shape(bias)}, expected {jnp.shape(weight)[1:]}."
        )
    output = inputs @ weight if bias is None else inputs @ weight + bias
    return mark_dense(output)


def run_tagged(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    values: Mapping[str, Array] | None,
    offsets: Mapping[str, Array] | None = None,
) -> tuple[Any, Nodes]:
    """Call `fn(params, x)` with the node states in `values` substituted (and the nodes in
    `offsets` handing on their prediction plus the offset).

    Returns the function's output and the dict of every tagged node's prediction. Raises if
    `values` names a node the function does not tag, or if it tags none. The function is traced
    and interpreted (`pcjax._harvest`).
    """
    out, predictions, _ = _harvested(fn, params, x, values, offsets)
    return out, predictions


def _harvested(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    values: Mapping[str, Array] | None,
    offsets: Mapping[str, Array] | None = None,
) -> tuple[Any, Nodes, Nodes]:
    """`run_tagged`, also returning the in-graph precisions (`pcjax.node(..., precision=)`)."""
    out, predictions, precisions = harvest(fn, precisions=True)(values, params, x, offsets=offsets)
    if not predictions:
        raise ValueError(NO_NODE)
    return out, predictions, precisions


def forward_init(fn: Callable[..., Any], params: Any, x: Any) -> Nodes:
    """Feedforward values of every tagged node of `fn(params, x)`.

    These are the usual initial states for inference: with them, every latent prediction error
    is zero and only clamped (observed) nodes carry error. Nodes tagged under `jax.vmap` or in
    a `lax.scan` body come batched / stacked (see [pcjax.node][]).

    **Returns:** a dict mapping node names to arrays.
    """
    _, predictions = run_tagged(fn, params, x, None)
    return predictions


def node_energies(
    fn: Callable[..., Any],
    params: Any,
    values: Mapping[str, Array],
    x: Any,
    observed: Collection[str] = (),
) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Callable]]:
    """Shapes and dtypes of every node's state and the custom energies, from a trace.

    Also validates `values` against the nodes: unknown names; the shape and dtype of the free
    states (the values not named in `observed`); the shape of the observed values, whose dtype
    is cast where they are used (`pcjax._harvest.check_states`).
    """
    shapes, energies, _ = tagged_nodes(fn, values, observed=observed)(params, x)
    if not shapes:
        raise ValueError(NO_NODE)
    return shapes, energies


def scan_depths(fn: Callable[..., Any], params: Any, x: Any) -> dict[str, int]:
    """For every node of `fn(params, x)`, the number of `lax.scan`s enclosing it: its state's
    leading stacked axes, which come before the batch axis."""
    return tagged_nodes(fn)(params, x)[2]


def predictions(fn: Callable[..., Any], params: Any, values: Mapping[str, Array], x: Any) -> Nodes:
    r"""Every node's prediction $\mu_i = g_i(\text{parents' states})$, given all node states."""
    return run_tagged(fn, params, x, values)[1]


def offset_predictions(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    errors: Mapping[str, Array],
    observed: Mapping[str, Array],
) -> Nodes:
    r"""Every node's prediction in the forward pass where each node in `errors` takes the
    value $\mu_i + \varepsilon_i$ and each node in `observed` its observed value (the error
    parameterisation, [pcjax.error_parameterised][])."""
    return run_tagged(fn, params, x, observed, errors)[1]


def predicted_with_precisions(
    fn: Callable[..., Any],
    params: Any,
    values: Mapping[str, Array],
    x: Any,
    errors: Mapping[str, Array] | None = None,
) -> tuple[Nodes, Nodes]:
    """`(predictions, in-graph precisions)`: as `predictions` (or, given `errors`, as
    `offset_predictions` with `values` the observed nodes), with the precisions that nodes
    tagged with `pcjax.node(..., precision=p)` compute in the same pass."""
    _, predicted, precisions = _harvested(fn, params, x, values, errors)
    return predicted, precisions


def mixed_precision(
    fn: Callable[..., Any], compute_dtype: Any = jnp.bfloat16, state_dtype: Any = jnp.float32
) -> Callable[..., Any]:
    """`fn` computing in `compute_dtype` (default bfloat16) with `state_dtype` nodes.

    The returned function casts the floating-point leaves of `params` and `x` to
    `compute_dtype` and calls `fn`; inside pcjax, every node's prediction is recorded in
    `state_dtype` (default float32), so states, prediction errors and the energy (and its sums
    over nodes and batch) are float32, and each node's state is cast back to `compute_dtype`
    where the function uses it. Parameter gradients arrive in the parameters' own dtype (keep
    float32 master parameters). Outside pcjax it is `fn` on cast inputs.

    The state dtype travels in the traced program (the cast inputs pass through a marker
    primitive), not in a Python side effect, so the returned function may itself sit behind
    `jax.jit`, `eqx.filter_jit` or `jax.checkpoint` with a warm cache. A function containing
    a `mixed_precision` call records every floating-point node in `state_dtype`.

    **Arguments:**

    - `fn`: the tagged forward function `fn(params, x)`.
    - `compute_dtype`: the dtype its parameters and inputs are cast to; default bfloat16.
    - `state_dtype`: the dtype of the node states, errors and energy; default float32.

    **Returns:** the function `wrapped(params, x)`, to use wherever `fn` goes
    ([pcjax.infer][], [pcjax.make_train_step][], the energy transformations).

    **Raises:** nothing itself; JAX raises for dtypes that are not floating-point.

    **Example** ([setup][examples-setup]):

    ```pycon
    >>> net = pc.mixed_precision(fn)  # bfloat16 matmuls, float32 states
    >>> states = pc.forward_init(net, params, x)
    >>> states["h"].dtype, net(params, x).dtype
    (dtype('float32'), dtype(bfloat16))
    >>> step = pc.make_train_step(net, pc.Equilibrium(pc.GradientDescent(4)), optax.sgd(0.1))

    ```
    """

    def cast(tree: Any) -> Any:
        return jax.tree.map(
            lambda a: (
                a.astype(compute_dtype)
                if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
                else a
            ),
            tree,
        )

    def wrapped(params: Any, x: Any) -> Any:
        # The marker puts the state dtype into the traced program itself, where pcjax reads it
        # (`pcjax._harvest.mixed_p`), so it survives jit / checkpoint caches around this call.
        params, x = mark_state_dtype((cast(params), cast(x)), state_dtype)
        return fn(params, x)

    return wrapped

r"""Tagging intermediate values of a JAX function as predictive-coding nodes.

A forward function becomes a PC network by wrapping the values that should be nodes in
`pcjax.node(name, value)`. The tag is a JAX primitive (`pcjax._harvest`): outside pcjax it is
the identity under every transformation, and inside pcjax the function is traced to a jaxpr and
evaluated by an interpreter that records each tagged value (the node's prediction $\mu$,
computed from whatever its parents returned) and hands back the node's own state $x$ instead, so
one call yields every node's prediction from its parents' *states*. Because the tag is part of
the traced program, it survives `jax.vmap`, `lax.scan`, `jax.jit` (whatever the state of its
cache) and `jax.checkpoint` inside the function.

The Kronecker and diagonal Fisher statistics still record `pcjax.dense` layers with a tape (a
`contextvars.ContextVar` active while the function is called directly), which sees the layers of
functions without inner transformations only.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._harvest import harvest, tag, tagged_nodes

Array = jax.Array
Nodes = dict[str, Array]


class _Tape:
    """Records node predictions during one call of a tagged function.

    `values` maps node names to the states substituted for them (`None`: substitute nothing,
    every node keeps its feedforward value).
    """

    def __init__(self, values: Mapping[str, Array] | None, record_dense: bool = False):
        self.values = values
        self.predictions: Nodes = {}
        # Only while Fisher statistics are gathered: every `dense` call, and which node
        # each tagged value became (by object identity).
        self.dense: list[DenseUse] | None = [] if record_dense else None
        self.node_of: dict[int, str] = {}
        # Nodes with a non-Gaussian energy (`pcjax.node(..., energy=f)`).
        self.energies: dict[str, Callable[[Array, Array], Array]] = {}
        # Set by `pcjax.mixed_precision`: (compute dtype, state dtype).
        self.dtypes: tuple[Any, Any] | None = None

    def visit(self, name: str, value: Array, energy=None) -> Array:
        if not isinstance(name, str):
            raise TypeError(f"pcjax.node: the node name must be a str, got {name!r}.")
        if name in self.predictions:
            raise ValueError(
                f"pcjax.node: node {name!r} is tagged twice in one call of the function; "
                "every node needs a unique name (e.g. add the layer index)."
            )
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"pcjax.node: node {name!r} must tag one array, got {type(value).__name__}. "
                "Tag each array of a pytree as its own node."
            )
        if energy is not None:
            if not callable(energy):
                raise TypeError(
                    f"pcjax.node: the energy of node {name!r} must be a function "
                    f"(state, prediction) -> scalar, got {type(energy).__name__}."
                )
            self.energies[name] = energy
        if self.dense is not None:
            self.node_of[id(value)] = name
        value = jnp.asarray(value)
        # Under `mixed_precision` the prediction is recorded (and the energy computed) in the
        # state dtype, while the function downstream keeps computing in the compute dtype.
        recorded = value if self.dtypes is None else value.astype(self.dtypes[1])
        self.predictions[name] = recorded
        if self.values is None or name not in self.values:
            return value
        state = self.values[name]
        if jnp.shape(state) != value.shape:
            raise ValueError(
                f"pcjax: the state of node {name!r} has shape {jnp.shape(state)} but its "
                f"prediction has shape {value.shape}; states must match the predictions "
                "(use pcjax.forward_init to get correctly shaped states)."
            )
        return state if self.dtypes is None else jnp.asarray(state).astype(self.dtypes[0])


NO_NODE = (
    "pcjax: the function tagged no node; wrap intermediate values in "
    "pcjax.node(name, value) to make them PC nodes."
)

_active_tape: contextvars.ContextVar[_Tape | None] = contextvars.ContextVar(
    "pcjax_active_tape", default=None
)


def node(
    name: str, value: Array, *, energy: Callable[[Array, Array], Array] | None = None
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
      `pcjax.cross_entropy` for a label node whose prediction is logits. Such nodes take no
      precision and no natural gradient.

    **Returns:** `value`, or the node's state when pcjax substitutes states.

    Tags may sit inside transformations of the function's own:

    - `jax.vmap` / `eqx.filter_vmap`: the node's state is batched, with the vmapped axis first
      (nested vmaps: outermost first); e.g. per-sample equinox layers vmapped over a batch.
    - `lax.scan`: the state is stacked along a new leading axis of the scan's length, one state
      per step (per time step of an RNN, per layer of a scan over layers); the prediction at
      step $t$ is computed from the body's inputs at step $t$, i.e. from the states of step
      $t - 1$ when they are carried.
    - `jax.jit`, `eqx.filter_jit`, `jax.checkpoint` / `eqx.filter_checkpoint`: transparent.
    - a node inside `lax.while_loop`, `lax.cond` / `switch`, a `custom_jvp` / `custom_vjp`
      function or `shard_map` raises a `ValueError` naming the node and the construct.
    """
    tape = _active_tape.get()
    if tape is not None and tape.dense is not None:
        return tape.visit(name, value, energy)
    return tag(name, value, energy=energy)


class DenseUse(NamedTuple):
    """One call of `pcjax.dense`: its input, parameters and output."""

    inputs: Array
    weight: Array
    bias: Array | None
    output: Array


def dense(inputs: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""A dense layer `inputs @ weight + bias`, visible to pcjax's Fisher statistics.

    It computes exactly `inputs @ weight (+ bias)`. Used as the prediction of a node,
    `pcjax.node(name, pcjax.dense(h, w, b))`, it lets the `"diagonal"` and `"kronecker"` modes
    of `pcjax.natural_gradient` find the layer's input $h$ and node, whose Fisher is
    $\mathbb{E}[h h^\top] \otimes P$. Pass the parameter arrays themselves (not
    transformed copies), and tag the result directly.

    **Arguments:** `inputs` of shape `(..., in)`, `weight` of shape `(in, out)`, optional `bias`
    of shape `(out,)`.
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
    tape = _active_tape.get()
    if tape is not None and tape.dense is not None:
        tape.dense.append(DenseUse(inputs, weight, bias, output))
    return output


def run_tagged(
    fn: Callable[..., Any],
    params: Any,
    x: Any,
    values: Mapping[str, Array] | None,
    tape: _Tape | None = None,
) -> tuple[Any, Nodes]:
    """Call `fn(params, x)` with the node states in `values` substituted.

    Returns the function's output and the dict of every tagged node's prediction. Raises if
    `values` names a node the function does not tag, or if it tags none. A `_Tape` that records
    `pcjax.dense` layers (for the Fisher statistics) calls the function directly under the tape;
    otherwise the function is traced and interpreted (`pcjax._harvest`).
    """
    if tape is not None and tape.dense is not None:
        return _run_under_tape(fn, params, x, values, tape)
    hook = _Tape(values)  # only collects `mixed_precision`'s dtypes while `fn` is traced
    token = _active_tape.set(hook)
    try:
        out, predictions = harvest(fn, record_dtype=lambda: _state_dtype(hook))(values, params, x)
    finally:
        _active_tape.reset(token)
    if not predictions:
        raise ValueError(NO_NODE)
    return out, predictions


def _state_dtype(tape: _Tape) -> Any:
    return None if tape.dtypes is None else tape.dtypes[1]


def _run_under_tape(
    fn: Callable[..., Any], params: Any, x: Any, values: Mapping[str, Array] | None, tape: _Tape
) -> tuple[Any, Nodes]:
    """The direct call under a recording tape (no inner transformations are seen through)."""
    token = _active_tape.set(tape)
    try:
        out = fn(params, x)
    finally:
        _active_tape.reset(token)
    if not tape.predictions:
        raise ValueError(NO_NODE)
    if values is not None:
        unknown = sorted(set(values) - set(tape.predictions))
        if unknown:
            raise ValueError(
                f"pcjax: unknown node(s) {unknown}; the function tags {sorted(tape.predictions)}."
            )
    return out, tape.predictions


def forward_init(fn: Callable[..., Any], params: Any, x: Any) -> Nodes:
    """Feedforward values of every tagged node of `fn(params, x)`.

    These are the usual initial states for inference: with them, every latent prediction error
    is zero and only clamped (observed) nodes carry error. Nodes tagged under `jax.vmap` or in
    a `lax.scan` body come batched / stacked (see `pcjax.node`).

    **Returns:** a dict mapping node names to arrays.
    """
    _, predictions = run_tagged(fn, params, x, None)
    return predictions


def node_energies(
    fn: Callable[..., Any], params: Any, values: Mapping[str, Array], x: Any
) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Callable]]:
    """Shapes of every node's prediction and the custom energies, from a trace.

    Also validates `values` against the nodes (unknown names, shapes), as `run_tagged` does.
    """
    hook = _Tape(values)
    token = _active_tape.set(hook)
    try:
        shapes, energies = tagged_nodes(fn)(params, x)
        if not shapes:
            raise ValueError(NO_NODE)
        jax.eval_shape(
            lambda: harvest(fn, record_dtype=lambda: _state_dtype(hook))(values, params, x)[1]
        )
    finally:
        _active_tape.reset(token)
    return shapes, energies


def predictions(fn: Callable[..., Any], params: Any, values: Mapping[str, Array], x: Any) -> Nodes:
    r"""Every node's prediction $\mu_i = g_i(\text{parents' states})$, given all node states."""
    return run_tagged(fn, params, x, values)[1]


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

        net = pcjax.mixed_precision(my_net)            # bfloat16 matmuls, float32 states
        pcjax.train_step(net, params, opt_state, x, observed, ...)
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
        tape = _active_tape.get()
        if tape is not None:
            tape.dtypes = (compute_dtype, state_dtype)
        return fn(cast(params), cast(x))

    return wrapped

"""Transformation-transparent node tags: a `pcjax_node` primitive and a jaxpr interpreter.

`tag(name, value)` binds the primitive `pcjax_node`, an identity that JAX's transformations
carry along like any other operation: under `jax.vmap` it is re-bound on the batched value
(batch axis moved to the front, so a vmapped node's state is `(batch, *shape)`), under
`jax.jvp`/`jax.grad` it tags the primal and lets the tangent through, under `jax.jit` it lowers
to nothing. So a tagged function stays an ordinary JAX function, and its traced program
(jaxpr) contains one `pcjax_node` equation per tag, wherever the tag sits: inside a nested
`jax.jit` (even one whose cache is warm), `jax.checkpoint`, `jax.vmap` or `lax.scan`.

`harvest(fn)` traces `fn` to a jaxpr and evaluates it with its own interpreter. At every
`pcjax_node` equation it records the tagged value $\\mu$ (the node's *prediction*) and, when a
state $x$ is given for the node, continues with $x$ in place of $\\mu$. Higher-order primitives
are handled recursively:

- `jit`, `closed_call`, `call`: evaluated inline (transparent);
- `remat2` (`jax.checkpoint`): re-wrapped in `jax.checkpoint` with the same policy, the node
  states as extra inputs and the predictions as extra outputs;
- `scan`: re-run as a `lax.scan` whose body interprets the body jaxpr. A node in the body has a
  state and a prediction stacked along a new leading axis of the scan length $T$: state
  `(T, *step_shape)`, slice $t$ used at step $t$; the prediction at step $t$ is computed from the
  body's inputs at step $t$ (so from the states of step $t-1$ when the carry is the previous
  step's node);
- `while`, `cond`, `custom_jvp_call`, `custom_vjp_call`, `shard_map` and any other primitive
  with a node inside: a `ValueError` naming the node and the construct.

Equations with no node inside are re-bound as they are (custom derivative rules included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.interpreters import ad, batching, mlir

Array = jax.Array

__all__ = ["harvest", "node_p", "tag", "tagged_nodes"]

Energy = Callable[[Array, Array], Array]


class _GraphPrecision:
    def __repr__(self) -> str:
        return "GRAPH_PRECISION"


#: What `tagged_nodes` reports as the energy of a node tagged with an in-graph precision.
GRAPH_PRECISION = _GraphPrecision()

# --------------------------------------------------------------------------------------------
# The primitive.

node_p = core.Primitive("pcjax_node")
"""`pcjax_node[name, energy](x[, p]) = x`: tags `x` as the prediction of the PC node `name`.

`energy` is the node's custom energy `(state, prediction) -> scalar`, or None (Gaussian); it
travels in the equation's parameters, so it is found even in a nested jit with a warm cache.
The optional second operand `p` (same shape as `x`) is the node's precision computed by the
function itself (`pcjax.node(..., precision=p)`); the output does not depend on it.
"""


def _node_impl(x: Array, *precision: Array, **params: Any) -> Array:
    del precision, params
    return x


def _node_abstract_eval(aval: Any, *precision: Any, **params: Any) -> Any:
    del precision, params
    return aval


def _node_batch(args: Sequence[Array], dims: Sequence[Any], **params: Any) -> tuple[Array, int]:
    """Re-tag the batched value with its batch axis moved to the front.

    So a node under `jax.vmap` has a state and a prediction of shape `(batch, *shape)`, whatever
    axis the batch happened to sit on inside the traced program (nested vmaps: outermost first).
    An in-graph precision follows the value; an operand without the batch axis is broadcast.
    """
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims)
    ]
    return node_p.bind(*moved, **params), 0


def _node_jvp(primals: Sequence[Array], tangents: Sequence[Any], **params: Any):
    """Tag the primal; the value's tangent passes through untouched (d tag(x) / dx = I; the
    output does not depend on an in-graph precision)."""
    return node_p.bind(*primals, **params), tangents[0]


def _node_transpose(ct: Any, *args: Any, **params: Any) -> list[Any]:
    del params
    return [ct, *(None for _ in args[1:])]


node_p.def_impl(_node_impl)
node_p.def_abstract_eval(_node_abstract_eval)
batching.primitive_batchers[node_p] = _node_batch
ad.primitive_jvps[node_p] = _node_jvp
ad.primitive_transposes[node_p] = _node_transpose
mlir.register_lowering(node_p, lambda ctx, x, *_, **__: [x])


def tag(name: str, value: Any, *, energy: Energy | None = None, precision: Any = None) -> Array:
    """Tag `value` as the prediction of the PC node `name`; returns `value`.

    Outside `harvest` this is the identity (under any JAX transformation). Inside `harvest`
    the value is recorded and, if the node has a state, the state is used downstream instead.
    `energy`, a function `(state, prediction) -> scalar`, replaces the Gaussian energy of the
    node (reported by `tagged_nodes`). `precision`, an array broadcastable to `value`, is the
    node's precision computed in the function (recorded by `harvest(..., precisions=True)`).
    """
    if not isinstance(name, str):
        raise TypeError(f"pcjax.node: the node name must be a str, got {name!r}.")
    if not (hasattr(value, "shape") and hasattr(value, "dtype")) and not isinstance(
        value, (int, float, complex)
    ):
        raise TypeError(
            f"pcjax.node: node {name!r} must tag one array, got {type(value).__name__}. "
            "Tag each array of a pytree as its own node."
        )
    if energy is not None and not callable(energy):
        raise TypeError(
            f"pcjax.node: the energy of node {name!r} must be a function "
            f"(state, prediction) -> scalar, got {type(energy).__name__}."
        )
    value = jnp.asarray(value)
    if precision is None:
        return node_p.bind(value, name=name, energy=energy)
    if energy is not None:
        raise ValueError(
            f"pcjax.node: node {name!r} has a custom energy and a precision; a precision "
            "belongs to the Gaussian energy (put it inside the custom energy instead)."
        )
    precision = jnp.asarray(precision)
    if not jnp.issubdtype(precision.dtype, jnp.floating):
        raise TypeError(
            f"pcjax.node: the precision of node {name!r} must be a floating-point array, got "
            f"dtype {precision.dtype}."
        )
    try:
        fits = jnp.broadcast_shapes(precision.shape, value.shape) == value.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"pcjax.node: the precision of node {name!r} has shape {precision.shape}, which "
            f"does not broadcast to the node's prediction of shape {value.shape}."
        )
    precision = jnp.broadcast_to(precision.astype(value.dtype), value.shape)
    return node_p.bind(value, precision, name=name, energy=None)


# --------------------------------------------------------------------------------------------
# Finding the nodes of a jaxpr.

_INLINE = frozenset({"jit", "pjit", "closed_call", "call", "core_call"})
_REMAT = frozenset({"remat2", "remat", "checkpoint"})
_CONSTRUCTS = {
    "while": "a lax.while_loop / lax.fori_loop",
    "cond": "a lax.cond / lax.switch branch",
    "custom_jvp_call": "a jax.custom_jvp function",
    "custom_vjp_call": "a jax.custom_vjp function",
    "shard_map": "a shard_map",
}
_ADVICE = {
    "while": "use lax.scan (or lax.fori_loop with static bounds, which is a scan)",
    "cond": "compute every branch and select with jnp.where",
    "custom_jvp_call": (
        "tag the value outside the custom_jvp function: its derivative rule cannot see "
        "the substituted state"
    ),
    "custom_vjp_call": (
        "tag the value outside the custom_vjp function: its derivative rule cannot see "
        "the substituted state"
    ),
}


def _subjaxprs(eqn: core.JaxprEqn) -> Iterator[tuple[core.Jaxpr, Sequence[Any]]]:
    """Every sub-jaxpr in the parameters of `eqn`, with its constants."""
    for param in eqn.params.values():
        for item in param if isinstance(param, tuple) else (param,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr, item.consts
            elif isinstance(item, core.Jaxpr):
                yield item, ()


class _Nodes:
    """The nodes of one traced program: their shapes, and which sub-jaxprs hold any.

    `avals[name]` is the node's (stacked) shape and dtype: the tagged value's shape, preceded by
    the length of every enclosing scan (outermost first).
    """

    def __init__(self, jaxpr: core.Jaxpr):
        self.avals: dict[str, jax.ShapeDtypeStruct] = {}
        self.energies: dict[str, Energy] = {}
        self.scan_depth: dict[str, int] = {}
        self.with_precision: set[str] = set()  # nodes tagged with an in-graph precision
        self._inside: dict[int, tuple[core.Jaxpr, frozenset[str]]] = {}
        self._walk(jaxpr, ())

    def inside(self, jaxpr: core.Jaxpr) -> frozenset[str]:
        """The names of the nodes tagged anywhere in `jaxpr` (recursively)."""
        key = id(jaxpr)
        if key not in self._inside:
            names: set[str] = set()
            for eqn in jaxpr.eqns:
                if eqn.primitive is node_p:
                    names.add(eqn.params["name"])
                for sub, _ in _subjaxprs(eqn):
                    names |= self.inside(sub)
            self._inside[key] = (jaxpr, frozenset(names))
        return self._inside[key][1]

    def _walk(self, jaxpr: core.Jaxpr, lead: tuple[int, ...]) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if eqn.primitive is node_p:
                self._add(eqn.params["name"], eqn.invars[0].aval, lead)
                if eqn.params["energy"] is not None:
                    self.energies[eqn.params["name"]] = eqn.params["energy"]
                if len(eqn.invars) > 1:
                    self.with_precision.add(eqn.params["name"])
                continue
            subs = [sub for sub, _ in _subjaxprs(eqn)]
            names = frozenset().union(*map(self.inside, subs))
            if not names:
                continue
            if name in _INLINE or name in _REMAT:
                for sub in subs:
                    self._walk(sub, lead)
            elif name == "scan":
                self._walk(eqn.params["jaxpr"].jaxpr, (*lead, eqn.params["length"]))
            else:
                raise _unsupported(name, names)

    def _add(self, name: str, aval: Any, lead: tuple[int, ...]) -> None:
        if name in self.avals:
            raise ValueError(
                f"pcjax.node: node {name!r} is tagged twice in one call of the function; "
                "every node needs a unique name (e.g. add the layer index). A node inside "
                "lax.scan counts once: its state is stacked over the steps."
            )
        self.avals[name] = jax.ShapeDtypeStruct((*lead, *aval.shape), aval.dtype)
        self.scan_depth[name] = len(lead)


def _unsupported(primitive: str, names: frozenset[str]) -> ValueError:
    construct = _CONSTRUCTS.get(primitive, f"the primitive {primitive!r}")
    advice = _ADVICE.get(primitive, "tag the value outside it")
    return ValueError(
        f"pcjax.node: node(s) {sorted(names)} are tagged inside {construct}, which pcjax "
        f"cannot substitute states into; {advice}."
    )


# --------------------------------------------------------------------------------------------
# The interpreter.


class _Harvester:
    """Evaluates jaxprs, recording node predictions and substituting node states.

    `states` holds the (already checked) states of the nodes this evaluation reaches, with the
    stacking of any enclosing scan already sliced away; `offsets` holds additive offsets of
    other nodes: such a node hands on its prediction plus the offset (the error
    parameterisation, `pcjax.error_parameterised`).
    """

    def __init__(
        self,
        nodes: _Nodes,
        states: Mapping[str, Array],
        record_dtype: Any,
        record: Mapping[str, Any] | None = None,
        offsets: Mapping[str, Array] | None = None,
    ):
        self.nodes = nodes
        self.states = states
        self.offsets = offsets or {}
        self.record_dtype = record_dtype
        self.predictions: dict[str, Array] = {}
        self.precisions: dict[str, Array] = {}  # in-graph precisions (`tag(..., precision=)`)
        # Dense layers whose inputs to record (`pcjax._dense`): node name -> site.
        self.record = record or {}
        self.inputs: dict[str, Array] = {}

    def child(self, inside: tuple[Mapping[str, Array], Mapping[str, Array]]) -> _Harvester:
        states, offsets = inside
        return _Harvester(self.nodes, states, self.record_dtype, self.record, offsets)

    def inside(self, names: frozenset[str]) -> tuple[dict[str, Array], dict[str, Array]]:
        """The states and offsets of the nodes `names` (those of a sub-jaxpr)."""
        return (
            {n: self.states[n] for n in sorted(names) if n in self.states},
            {n: self.offsets[n] for n in sorted(names) if n in self.offsets},
        )

    def results(self) -> tuple[dict[str, Array], dict[str, Array], dict[str, Array]]:
        return self.predictions, self.inputs, self.precisions

    def merge(self, results: tuple[Mapping[str, Array], ...]) -> None:
        self.predictions.update(results[0])
        self.inputs.update(results[1])
        self.precisions.update(results[2])

    def run(self, jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[core.Var, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, core.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if eqn.primitive is node_p and eqn.params["name"] in self.record:
                site = self.record[eqn.params["name"]]
                self.inputs[site.node] = jnp.moveaxis(read(site.inputs), site.input_axis, -1)
            with eqn.ctx.manager:
                outvals = self.eqn(eqn, invals)
            env.update(zip(eqn.outvars, outvals))
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if eqn.primitive is node_p:
            return [self.visit(eqn.params["name"], *invals)]
        subs = list(_subjaxprs(eqn))
        if not any(self.nodes.inside(sub) for sub, _ in subs):
            params = eqn.primitive.get_bind_params(eqn.params)
            out = eqn.primitive.bind(*invals, **params)
            return list(out) if eqn.primitive.multiple_results else [out]
        if name in _INLINE:
            ((sub, consts),) = subs
            return self.run(sub, consts, invals)
        if name in _REMAT:
            return self.remat(eqn, invals)
        if name == "scan":
            return self.scan(eqn, invals)
        raise AssertionError(f"unreachable: {name}")  # _Nodes rejected it already

    def visit(self, name: str, value: Array, precision: Array | None = None) -> Array:
        """Record `value` as the prediction of `name` (and its in-graph `precision`, if any);
        return the node's state if it has one."""
        recorded = value
        if self.record_dtype is not None and jnp.issubdtype(value.dtype, jnp.inexact):
            recorded = value.astype(self.record_dtype)
        self.predictions[name] = recorded
        if precision is not None:
            self.precisions[name] = precision.astype(recorded.dtype)
        if name in self.offsets:
            return value + self.offsets[name].astype(value.dtype)
        if name not in self.states:
            return value
        state = self.states[name]
        return state if state.dtype == value.dtype else state.astype(value.dtype)

    def remat(self, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
        """`jax.checkpoint` of the interpreted body, states in and predictions out."""
        jaxpr = eqn.params["jaxpr"]
        names = self.nodes.inside(jaxpr)

        def body(args: list[Any], inside: tuple[dict, dict]) -> tuple[list[Any], dict]:
            inner = self.child(inside)
            return inner.run(jaxpr, (), args), inner.results()

        body = jax.checkpoint(
            body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
        )
        outs, results = body(invals, self.inside(names))
        self.merge(results)
        return outs

    def scan(self, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
        """`lax.scan` of the interpreted body, stacked states as extra xs, predictions as ys."""
        p = eqn.params
        closed, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
        names = self.nodes.inside(closed.jaxpr)
        consts = invals[:n_consts]
        init, xs = invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]

        def body(carry: list[Any], step: tuple[list[Any], tuple]) -> tuple[list[Any], Any]:
            x, inside = step
            inner = self.child(inside)
            outs = inner.run(closed.jaxpr, closed.consts, [*consts, *carry, *x])
            return outs[:n_carry], (outs[n_carry:], inner.results())

        carry, (ys, results) = lax.scan(
            body,
            list(init),
            (list(xs), self.inside(names)),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        self.merge(results)
        return [*carry, *ys]


# --------------------------------------------------------------------------------------------
# The public entry points.


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _trace(fn: Callable[..., Any], args: tuple[Any, ...]):
    """Trace `fn(*args)` on the array leaves of `args` (other leaves stay static)."""
    leaves, treedef = jax.tree.flatten(args)
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def flat_fn(*arrays: Any) -> Any:
        full = list(leaves)
        for i, a in zip(dynamic, arrays):
            full[i] = a
        return fn(*jax.tree.unflatten(treedef, full))

    arrays = [leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    return closed, jax.tree.structure(out_shape), arrays


def _check_states(nodes: _Nodes, values: Mapping[str, Any], record_dtype: Any) -> dict:
    """Unknown names, shapes and dtypes of the states; returns them as arrays."""
    if not isinstance(values, Mapping):
        raise TypeError(
            f"pcjax: `values` must map node names to states, got {type(values).__name__}."
        )
    unknown = sorted(set(values) - set(nodes.avals), key=str)
    if unknown:
        raise ValueError(
            f"pcjax: unknown node(s) {unknown} in `values`; the function tags "
            f"{sorted(nodes.avals)}."
        )
    states = {}
    for name, state in values.items():
        aval = nodes.avals[name]
        dtype = aval.dtype
        if record_dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.dtype(record_dtype)
        state = jnp.asarray(state)
        if state.shape != aval.shape or state.dtype != dtype:
            depth = nodes.scan_depth[name]
            where = (
                f" (the node is inside {depth} lax.scan(s): its state is stacked along "
                f"{depth} leading axis(es) of the scan lengths {aval.shape[:depth]})"
                if depth
                else ""
            )
            raise ValueError(
                f"pcjax: the state of node {name!r} has shape {state.shape} and dtype "
                f"{state.dtype}, but its prediction has shape {aval.shape} and dtype "
                f"{dtype}{where}; use the predictions of pcjax.forward_init as states."
            )
        states[name] = state
    return states


def _record_dtype(record_dtype: Any) -> Any:
    """`record_dtype` as a dtype (or None), calling it first if it is a hook."""
    if record_dtype is None:
        return None
    try:
        return jnp.dtype(record_dtype)
    except TypeError:
        if not callable(record_dtype):
            raise TypeError(
                f"pcjax: `record_dtype` must be a dtype, a function returning one, or None; "
                f"got {record_dtype!r}."
            ) from None
    chosen = record_dtype()
    return None if chosen is None else jnp.dtype(chosen)


def harvest(
    fn: Callable[..., Any],
    *,
    record_dtype: Any | Callable[[], Any] = None,
    precisions: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """`fn` with its node states substituted and its node predictions returned.

    `harvest(fn)(values, *args)` evaluates `fn(*args)`; each node tagged in it records its
    tagged value (its prediction $\\mu$) and, if `values` holds a state $x$ for it, hands $x$ on
    downstream instead of $\\mu$. It returns `(output, predictions)`, `predictions` mapping every
    node name to its prediction. A node tagged in a `lax.scan` body has its state and prediction
    stacked along a leading axis of the scan length; a node under `jax.vmap` is batched.

    **Arguments:**

    - `fn`: a function tagging its nodes with `tag(name, value)`.
    - `record_dtype`: if given, floating-point predictions are recorded in this dtype, states
      must have it, and each state is cast to the node's own dtype where it is used
      (mixed precision). A function of no arguments is called after `fn` is traced (a hook
      for wrappers that choose the dtype while `fn` runs); it may return None.

    `offsets` (keyword): nodes that hand on their prediction plus this offset instead (the
    error parameterisation: the offset is the node's prediction error); they must not also be
    in `values`.

    `precisions=True`: return `(output, predictions, precisions)`, the last mapping every node
    tagged with an in-graph precision (`tag(..., precision=p)`) to that precision, stacked and
    batched like its prediction and in its dtype.

    `values` may be `None` (no substitution). The returned function works under `jax.jit`,
    `jax.grad` and `jax.vmap`. Array leaves of `args` are traced; other leaves are static.
    """

    def wrapped(
        values: Mapping[str, Any] | None, *args: Any, offsets: Mapping[str, Any] | None = None
    ) -> tuple[Any, dict[str, Array]]:
        closed, out_tree, arrays = _trace(fn, args)
        nodes = _Nodes(closed.jaxpr)
        dtype = _record_dtype(record_dtype)
        states = _check_states(nodes, {} if values is None else values, dtype)
        offsets = _check_states(nodes, {} if offsets is None else offsets, dtype)
        both = sorted(set(states) & set(offsets))
        if both:
            raise ValueError(f"pcjax: node(s) {both} given both a state and an offset.")
        harvester = _Harvester(nodes, states, dtype, offsets=offsets)
        outs = harvester.run(closed.jaxpr, closed.consts, arrays)
        predictions = {name: harvester.predictions[name] for name in nodes.avals}
        out = jax.tree.unflatten(out_tree, outs)
        if precisions:
            return out, predictions, dict(harvester.precisions)
        return out, predictions

    return wrapped


def tagged_nodes(
    fn: Callable[..., Any],
    values: Mapping[str, Any] | None = None,
    *,
    record_dtype: Any | Callable[[], Any] = None,
) -> Callable[..., tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Energy], dict[str, int]]]:
    """`tagged_nodes(fn)(*args)`: the nodes of `fn(*args)`, from a trace (nothing is computed).

    **Returns:** every node's (stacked) shape and dtype, in program order; the custom energies
    of the nodes tagged with one (`GRAPH_PRECISION` for the nodes tagged with an in-graph
    precision); and every node's number of enclosing scans (its leading stacked axes). Given
    `values` (and `record_dtype`, as for `harvest`), the states are checked against the nodes
    as `harvest` checks them, in the same trace.
    """

    def wrapped(*args: Any):
        closed, _, _ = _trace(fn, args)
        nodes = _Nodes(closed.jaxpr)
        if values is not None:
            _check_states(nodes, values, _record_dtype(record_dtype))
        energies = {**dict(nodes.energies), **dict.fromkeys(nodes.with_precision, GRAPH_PRECISION)}
        return dict(nodes.avals), energies, dict(nodes.scan_depth)

    return wrapped

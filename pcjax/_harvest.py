"""Transformation-transparent node tags: a `pcjax_node` primitive and a jaxpr interpreter.

`tag(name, value)` binds the primitive `pcjax_node`, an identity that JAX's transformations
carry along like any other operation: under `jax.vmap` it is re-bound on the batched value
(batch axis moved to the front, so a vmapped node's state is `(batch, *shape)`; a value that
does not carry the batch is broadcast along it), under
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

`pcjax.mixed_precision` marks its cast inputs with the identity primitive
`pcjax_mixed_precision[state_dtype]`; a program containing it records every floating-point
prediction in that dtype (and its states must have it). The dtype is read from the traced
program, so it is found behind warm `jax.jit` / `eqx.filter_jit` / `jax.checkpoint` caches.

One top-level call of pcjax traces the user's function once: the entry points open a
`trace_scope`, within which `trace` reuses the jaxpr of an earlier trace of the same function on
arguments of the same structure, static leaves and abstract values. The cache lives only as long
as the scope, so a function closing over Python values that change between calls is retraced on
the next call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.interpreters import ad, batching, mlir

Array = jax.Array

__all__ = [
    "INLINE_PRIMITIVES",
    "REMAT_PRIMITIVES",
    "Harvester",
    "NodeTable",
    "Traced",
    "check_states",
    "harvest",
    "is_array",
    "mark_state_dtype",
    "mixed_p",
    "node_p",
    "tag",
    "tagged_nodes",
    "trace",
    "trace_scope",
    "traces_once",
]

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


def _node_batch(
    axis_data: Any, args: Sequence[Array], dims: Sequence[Any], **params: Any
) -> tuple[Array, int]:
    """Re-tag the batched value with its batch axis moved to the front.

    So a node under `jax.vmap` has a state and a prediction of shape `(batch, *shape)`, whatever
    axis the batch happened to sit on inside the traced program (nested vmaps: outermost first).
    JAX calls this rule for every tag bound inside a vmap, also when no operand carries the
    batch (a node computed from parameters only, `pcjax.node("z", params["prior"])`): such a
    value is broadcast along the batch, so that every sample has its own state. An in-graph
    precision follows the value; an operand without the batch axis is broadcast.
    """
    size = axis_data.size
    moved = [
        jnp.broadcast_to(a, (size, *jnp.shape(a))) if d is None else jnp.moveaxis(a, d, 0)
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
batching.fancy_primitive_batchers[node_p] = _node_batch
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
# The mixed-precision marker.

mixed_p = core.Primitive("pcjax_mixed_precision")
"""`pcjax_mixed_precision[state_dtype](*xs) = xs`: marks the (cast) inputs of a function wrapped
by `pcjax.mixed_precision`. A program containing it records every floating-point node
prediction in `state_dtype`. Being an equation of the traced program (its outputs feed the
function), it is found wherever the program comes from: a fresh trace or a warm jit cache."""
mixed_p.multiple_results = True
mixed_p.def_impl(lambda *xs, state_dtype: list(xs))
mixed_p.def_abstract_eval(lambda *avals, state_dtype: list(avals))
batching.primitive_batchers[mixed_p] = lambda args, dims, **params: (
    mixed_p.bind(*args, **params),
    list(dims),
)
ad.primitive_jvps[mixed_p] = lambda primals, tangents, **params: (
    mixed_p.bind(*primals, **params),
    list(tangents),
)
mlir.register_lowering(mixed_p, lambda ctx, *xs, **_: list(xs))

T = TypeVar("T")


def mark_state_dtype(tree: T, state_dtype: Any) -> T:
    """Pass the array leaves of `tree` through the `pcjax_mixed_precision` marker, so that the
    traced program of a function using them records its node predictions in `state_dtype`."""
    dtype = jnp.dtype(state_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"pcjax.mixed_precision: `state_dtype` must be a float dtype, got {dtype}.")
    leaves, treedef = jax.tree.flatten(tree)
    positions = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
    if not positions:  # nothing to mark: a marker on a dummy operand keeps the dtype in the program
        mixed_p.bind(jnp.zeros((), dtype), state_dtype=dtype)
        return tree
    marked = mixed_p.bind(*(leaves[i] for i in positions), state_dtype=dtype)
    for i, value in zip(positions, marked):
        leaves[i] = value
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------
# Finding the nodes of a jaxpr.

INLINE_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "call", "core_call"})
REMAT_PRIMITIVES = frozenset({"remat2", "remat", "checkpoint"})
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


class NodeTable:
    """The nodes of one traced program: their shapes, and which sub-jaxprs hold any.

    `avals[name]` is the shape and dtype of the node's state: the tagged value's shape, preceded
    by the length of every enclosing scan (outermost first), in the tagged value's dtype, or in
    `state_dtype` for a floating-point node when the program contains a `pcjax.mixed_precision`
    marker (`mixed_p`); `state_dtype` is None otherwise.
    """

    def __init__(self, jaxpr: core.Jaxpr):
        self.avals: dict[str, jax.ShapeDtypeStruct] = {}
        self.energies: dict[str, Energy] = {}
        self.scan_depth: dict[str, int] = {}
        self.with_precision: set[str] = set()  # nodes tagged with an in-graph precision
        self._inside: dict[int, tuple[core.Jaxpr, frozenset[str]]] = {}
        self.state_dtype = _state_dtype(jaxpr)
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
            if name in INLINE_PRIMITIVES or name in REMAT_PRIMITIVES:
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
        dtype = aval.dtype
        if self.state_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = self.state_dtype
        self.avals[name] = jax.ShapeDtypeStruct((*lead, *aval.shape), dtype)
        self.scan_depth[name] = len(lead)


def _state_dtypes(jaxpr: core.Jaxpr, seen: set[int]) -> set[Any]:
    """The `state_dtype`s of every `pcjax_mixed_precision` marker in `jaxpr` (recursively)."""
    found: set[Any] = set()
    if id(jaxpr) in seen:
        return found
    seen.add(id(jaxpr))
    for eqn in jaxpr.eqns:
        if eqn.primitive is mixed_p:
            found.add(jnp.dtype(eqn.params["state_dtype"]))
        for sub, _ in _subjaxprs(eqn):
            found |= _state_dtypes(sub, seen)
    return found


def _state_dtype(jaxpr: core.Jaxpr) -> Any:
    """The one state dtype that the program's `pcjax.mixed_precision` markers ask for, or None."""
    dtypes = _state_dtypes(jaxpr, set())
    if len(dtypes) > 1:
        raise ValueError(
            "pcjax.mixed_precision: the function nests mixed_precision wrappers with different "
            f"state dtypes {sorted(map(str, dtypes))}; use one state dtype."
        )
    return next(iter(dtypes), None)


def _unsupported(primitive: str, names: frozenset[str]) -> ValueError:
    construct = _CONSTRUCTS.get(primitive, f"the primitive {primitive!r}")
    advice = _ADVICE.get(primitive, "tag the value outside it")
    return ValueError(
        f"pcjax.node: node(s) {sorted(names)} are tagged inside {construct}, which pcjax "
        f"cannot substitute states into; {advice}."
    )


# --------------------------------------------------------------------------------------------
# The interpreter.


class Harvester:
    """Evaluates jaxprs, recording node predictions and substituting node states.

    `states` holds the (already checked) states of the nodes this evaluation reaches, with the
    stacking of any enclosing scan already sliced away; `offsets` holds additive offsets of
    other nodes: such a node hands on its prediction plus the offset (the error
    parameterisation, `pcjax.error_parameterised`).
    """

    def __init__(
        self,
        nodes: NodeTable,
        states: Mapping[str, Array],
        record: Mapping[str, Any] | None = None,
        offsets: Mapping[str, Array] | None = None,
    ):
        self.nodes = nodes
        self.states = states
        self.offsets = offsets or {}
        self.predictions: dict[str, Array] = {}
        self.precisions: dict[str, Array] = {}  # in-graph precisions (`tag(..., precision=)`)
        # Dense layers whose inputs to record (`pcjax._dense`): node name -> site.
        self.record = record or {}
        self.inputs: dict[str, Array] = {}

    def child(self, inside: tuple[Mapping[str, Array], Mapping[str, Array]]) -> Harvester:
        states, offsets = inside
        return Harvester(self.nodes, states, self.record, offsets)

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
        if eqn.primitive is mixed_p:  # read by NodeTable already; an identity here
            return invals
        subs = list(_subjaxprs(eqn))
        if not any(self.nodes.inside(sub) for sub, _ in subs):
            params = eqn.primitive.get_bind_params(eqn.params)
            out = eqn.primitive.bind(*invals, **params)
            return list(out) if eqn.primitive.multiple_results else [out]
        if name in INLINE_PRIMITIVES:
            ((sub, consts),) = subs
            return self.run(sub, consts, invals)
        if name in REMAT_PRIMITIVES:
            return self.remat(eqn, invals)
        if name == "scan":
            return self.scan(eqn, invals)
        raise AssertionError(f"unreachable: {name}")  # NodeTable rejected it already

    def visit(self, name: str, value: Array, precision: Array | None = None) -> Array:
        """Record `value` as the prediction of `name` (and its in-graph `precision`, if any);
        return the node's state if it has one."""
        recorded = value
        dtype = self.nodes.state_dtype
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            recorded = value.astype(dtype)
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
# Tracing, once per top-level call.


def is_array(leaf: Any) -> bool:
    """Whether a pytree leaf is traced (an array) rather than static."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class Traced(NamedTuple):
    """A traced function: its closed jaxpr, output structure, which leaves of the arguments are
    its inputs (the array leaves), its nodes, and a memo for analyses of the same program (the
    dense layers of `pcjax._dense`)."""

    closed: core.ClosedJaxpr
    out_tree: Any
    dynamic: tuple[int, ...]
    nodes: NodeTable
    memo: dict[Any, Any]


_scope: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pcjax_trace_scope", default=None
)


@contextlib.contextmanager
def trace_scope() -> Iterator[None]:
    """Within this scope, `trace` traces each function once per argument signature.

    Scopes nest: an inner scope shares the outermost one's cache, which ends with it. Open one
    per top-level call (see `traces_once`), never for longer: a function closing over Python
    values (or arrays) that change between calls would see stale values in a longer-lived cache.
    """
    if _scope.get() is not None:
        yield
        return
    token = _scope.set({})
    try:
        yield
    finally:
        _scope.reset(token)


F = TypeVar("F", bound=Callable[..., Any])


def traces_once(function: F) -> F:
    """Decorate a pcjax entry point so that one call of it traces the user's function once
    (it runs inside a `trace_scope`)."""

    @functools.wraps(function)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        with trace_scope():
            return function(*args, **kwargs)

    return scoped  # type: ignore[return-value]


def _signature(fn: Callable[..., Any], leaves: list[Any], treedef: Any) -> Any:
    """The cache key of `fn` traced on these argument leaves, or None if it has none (an
    unhashable static leaf). Static leaves are keyed with their type (1 and 1.0 trace
    differently); array leaves by their abstract value (shape, dtype, weak type, sharding)."""
    parts = tuple(
        ("array", jax.typeof(leaf)) if is_array(leaf) else ("static", type(leaf), leaf)
        for leaf in leaves
    )
    key = (id(fn), treedef, parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def trace(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Traced, list[Any]]:
    """Trace `fn(*args)` on the array leaves of `args` (other leaves stay static).

    Returns the `Traced` program and this call's array leaves (its inputs). Inside a
    `trace_scope`, a function already traced on arguments of the same signature is not traced
    again.
    """
    leaves, treedef = jax.tree.flatten(args)
    dynamic = tuple(i for i, leaf in enumerate(leaves) if is_array(leaf))
    arrays = [leaves[i] for i in dynamic]
    cache = _scope.get()
    key = None if cache is None else _signature(fn, leaves, treedef)
    if key is not None and key in cache:
        return cache[key][1], arrays

    def flat_fn(*inputs: Any) -> Any:
        full = list(leaves)
        for i, a in zip(dynamic, inputs):
            full[i] = a
        return fn(*jax.tree.unflatten(treedef, full))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    traced = Traced(closed, jax.tree.structure(out_shape), dynamic, NodeTable(closed.jaxpr), {})
    if key is not None:
        cache[key] = (fn, traced)  # holding `fn` keeps its id from being reused in the scope
    return traced, arrays


# --------------------------------------------------------------------------------------------
# Checking states and observed values.


def _scan_note(nodes: NodeTable, name: str) -> str:
    depth = nodes.scan_depth[name]
    if not depth:
        return ""
    return (
        f" (the node is inside {depth} lax.scan(s): its state is stacked along {depth} "
        f"leading axis(es) of the scan lengths {nodes.avals[name].shape[:depth]})"
    )


def _numeric(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)


def check_states(
    nodes: NodeTable, values: Mapping[str, Any], observed: Collection[str] | None = None
) -> dict[str, Array]:
    """Check node values against the nodes: unknown names, shapes and dtypes; return them as
    arrays.

    `observed` names the values that are observed (clamped: labels, targets). Their dtype need
    not match (an int one-hot label, float32 targets under x64): each is cast to the node's
    dtype where it is used. A free state must have its node's shape and state dtype (the dtype
    of `pcjax.forward_init`'s predictions, float32 under `pcjax.mixed_precision`), so that
    inference runs in that dtype. With `observed=None` (an inner evaluation whose values were
    checked at the entry point) only shapes are checked, and any numeric value is cast.

    Raises `TypeError` for a non-mapping, `ValueError` naming the node and the shapes / dtypes
    otherwise.
    """
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
    strict = set() if observed is None else set(values) - set(observed)
    checked = {}
    for name, value in values.items():
        aval, value = nodes.avals[name], jnp.asarray(value)
        shape_ok = value.shape == aval.shape
        if name in strict:
            if not shape_ok or value.dtype != aval.dtype:
                raise ValueError(
                    f"pcjax: the state of node {name!r} has shape {value.shape} and dtype "
                    f"{value.dtype}, but its prediction has shape {aval.shape} and dtype "
                    f"{aval.dtype}{_scan_note(nodes, name)}; use the predictions of "
                    "pcjax.forward_init as states."
                )
        elif not shape_ok or not _numeric(value.dtype):
            what = "observed value" if observed is not None else "value (state or observed)"
            raise ValueError(
                f"pcjax: the {what} of node {name!r} has shape {value.shape} and dtype "
                f"{value.dtype}, but its prediction has shape {aval.shape} and dtype "
                f"{aval.dtype}{_scan_note(nodes, name)}; an observed value must have the "
                "prediction's shape (its dtype is cast to the prediction's)."
            )
        checked[name] = value
    return checked


# --------------------------------------------------------------------------------------------
# The public entry points.


def harvest(fn: Callable[..., Any], *, precisions: bool = False) -> Callable[..., tuple[Any, ...]]:
    """`fn` with its node states substituted and its node predictions returned.

    `harvest(fn)(values, *args)` evaluates `fn(*args)`; each node tagged in it records its
    tagged value (its prediction $\\mu$) and, if `values` holds a state $x$ for it, hands $x$ on
    downstream instead of $\\mu$. It returns `(output, predictions)`, `predictions` mapping every
    node name to its prediction. A node tagged in a `lax.scan` body has its state and prediction
    stacked along a leading axis of the scan length; a node under `jax.vmap` is batched. If the
    program contains a `pcjax.mixed_precision` marker, floating-point predictions are recorded
    in its state dtype, and each value is cast to the node's own dtype where it is used.

    **Keyword arguments of the returned function:**

    - `offsets`: nodes that hand on their prediction plus this offset instead (the error
      parameterisation: the offset is the node's prediction error); they must not also be in
      `values`.
    - `observed`: the names in `values` that are observed values; the others are states and
      must have their node's dtype (see `check_states`). None (default): dtypes are not
      checked, values are cast.

    `precisions=True`: return `(output, predictions, precisions)`, the last mapping every node
    tagged with an in-graph precision (`tag(..., precision=p)`) to that precision, stacked and
    batched like its prediction and in its dtype.

    `values` may be `None` (no substitution). The returned function works under `jax.jit`,
    `jax.grad` and `jax.vmap`. Array leaves of `args` are traced; other leaves are static.
    """

    def wrapped(
        values: Mapping[str, Any] | None,
        *args: Any,
        offsets: Mapping[str, Any] | None = None,
        observed: Collection[str] | None = None,
    ) -> tuple[Any, ...]:
        traced, arrays = trace(fn, args)
        nodes = traced.nodes
        states = check_states(nodes, {} if values is None else values, observed)
        offsets = check_states(nodes, {} if offsets is None else offsets)
        both = sorted(set(states) & set(offsets))
        if both:
            raise ValueError(f"pcjax: node(s) {both} given both a state and an offset.")
        harvester = Harvester(nodes, states, offsets=offsets)
        outs = harvester.run(traced.closed.jaxpr, traced.closed.consts, arrays)
        predictions = {name: harvester.predictions[name] for name in nodes.avals}
        out = jax.tree.unflatten(traced.out_tree, outs)
        if precisions:
            return out, predictions, dict(harvester.precisions)
        return out, predictions

    return wrapped


def tagged_nodes(
    fn: Callable[..., Any],
    values: Mapping[str, Any] | None = None,
    *,
    observed: Collection[str] | None = None,
) -> Callable[..., tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Energy], dict[str, int]]]:
    """`tagged_nodes(fn)(*args)`: the nodes of `fn(*args)`, from a trace (nothing is computed).

    **Returns:** every node's (stacked) state shape and dtype, in program order; the custom
    energies of the nodes tagged with one (`GRAPH_PRECISION` for the nodes tagged with an
    in-graph precision); and every node's number of enclosing scans (its leading stacked axes).
    Given `values` (and `observed`, the names among them that are observed values), they are
    checked against the nodes with `check_states`, in the same trace.
    """

    def wrapped(*args: Any):
        traced, _ = trace(fn, args)
        nodes = traced.nodes
        if values is not None:
            check_states(nodes, values, observed)
        energies = {**dict(nodes.energies), **dict.fromkeys(nodes.with_precision, GRAPH_PRECISION)}
        return dict(nodes.avals), energies, dict(nodes.scan_depth)

    return wrapped

r"""Finding the dense layers of a tagged function, for the Kronecker and diagonal Fisher.

A node whose prediction is a dense layer of the parameters,
$\mu = h W + b$ (or $W h + b$ with $W$ stored `(out, in)`, as `eqx.nn.Linear` does), has the
Fisher block $\mathbb{E}[h h^\top] \otimes P$. To build it we need, for every such node, the
parameter leaves $W$ and $b$ and the layer's input $h$. They are read off the traced program
(jaxpr), so they are found wherever the layer sits: under `jax.vmap` (per-sample equinox layers),
in a `lax.scan` body (a weight shared by every step, or a stacked weight sliced per layer), in a
nested `jax.jit` or `jax.checkpoint`.

The pattern, read backwards from the node's tag within one jaxpr:

    node <- [transpose | convert_element_type | pcjax_dense]* <- [add(., bias)]
         <- [transpose | convert_element_type]* <- dot_general(h, W) or dot_general(W, h)

where `W` is a 2-D parameter leaf (possibly cast, possibly sliced by enclosing scans) contracted
on one axis with one axis of `h`, no batch dimensions, and `W`'s free axis ends up as the node's
last axis (the axis the node's precision acts on); `bias` is a 1-D parameter leaf broadcast onto
that axis. Anything else is not a dense layer here (its parameters are not preconditioned by the
Kronecker/diagonal modes; `pcjax.fisher_mask` shows which are).

`pcjax.dense` marks its output with the identity primitive `pcjax_dense`; a marked layer that
does not match (its output not tagged directly, its weight a transformed copy) is an error, so a
layer the user meant to be preconditioned is never silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import ad, batching, mlir

from ._harvest import (
    INLINE_PRIMITIVES,
    REMAT_PRIMITIVES,
    Harvester,
    check_states,
    is_array,
    mixed_p,
    node_p,
    trace,
)

Array = jax.Array

# --------------------------------------------------------------------------------------------
# The `pcjax.dense` marker: an identity primitive on the layer's output.

dense_p = core.Primitive("pcjax_dense")
dense_p.def_impl(lambda x: x)
dense_p.def_abstract_eval(lambda aval: aval)
batching.primitive_batchers[dense_p] = lambda args, dims: (dense_p.bind(args[0]), dims[0])
ad.primitive_jvps[dense_p] = lambda primals, tangents: (dense_p.bind(primals[0]), tangents[0])
ad.primitive_transposes[dense_p] = lambda ct, x: [ct]
mlir.register_lowering(dense_p, lambda ctx, x: [x])


def mark_dense(output: Array) -> Array:
    """Mark `output` as a dense layer the Fisher statistics must find (`pcjax.dense`)."""
    return dense_p.bind(output)


# --------------------------------------------------------------------------------------------
# The analysis.


class Origin(NamedTuple):
    """A value that is a parameter leaf: its index among the floating-point leaves of the
    parameters, and per enclosing `lax.scan` whether the scan slices it (True: the leaf is
    stacked along that scan) or passes it whole to every step (False)."""

    leaf: int
    sliced: tuple[bool, ...]


class DenseSite(NamedTuple):
    """A node whose prediction is a dense layer of parameter leaves.

    `inputs` is the layer input $h$ (a variable of the jaxpr holding the node) with its feature
    axis `input_axis`; `weight` / `bias` the leaves' origins; `transposed`: the weight is stored
    `(out, in)`; `depth`: the number of scans enclosing the node; `scale`, `bias_scale`: the
    constant factors multiplying the layer's weight and bias terms in the prediction (a scaled
    residual branch, say).
    """

    node: str
    inputs: core.Var
    input_axis: int
    weight: Origin
    bias: Origin | None
    transposed: bool
    depth: int
    scale: float = 1.0  # constant factors on the way: mu = scale * h W + bias_scale * b + ...
    bias_scale: float = 1.0


# Operations whose outputs are their inputs as far as the Fisher goes: a cast and the marker of
# `pcjax.mixed_precision`, marking a replicated value device-varying (inside `shard_map`).
_SAME_VALUE = frozenset({"convert_element_type", "pvary", "pbroadcast", mixed_p.name})


class _Finder:
    """Walks a jaxpr (into jit, checkpoint and scan bodies) and collects the dense sites, and
    how often each parameter leaf is used."""

    def __init__(self):
        self.sites: dict[str, DenseSite] = {}
        self.marks: dict[int, str | None] = {}  # pcjax_dense equations -> the node they feed
        self.misses: dict[str, list[int]] = {}  # node -> pcjax_dense marks on it, not matched
        self.uses: dict[int, int] = {}

    def walk(self, jaxpr: core.Jaxpr, origins: dict[core.Var, Origin], depth: int) -> None:
        producers: dict[core.Var, core.JaxprEqn] = {}
        for eqn in jaxpr.eqns:
            for out in eqn.outvars:
                producers[out] = eqn
            name = eqn.primitive.name
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            sub = getattr(sub, "jaxpr", sub)
            if name in _SAME_VALUE:
                for i, o in zip(eqn.invars, eqn.outvars):
                    if _var(i) in origins:
                        origins[o] = origins[i]
                continue
            if name == "scan":
                self._scan(eqn, origins, depth)
                continue
            if (name in INLINE_PRIMITIVES or name in REMAT_PRIMITIVES) and (
                isinstance(sub, core.Jaxpr) and len(sub.invars) == len(eqn.invars)
            ):
                self.walk(sub, _pass_on(eqn.invars, sub.invars, origins, None), depth)
                continue
            self._count(eqn.invars, origins)
            if eqn.primitive is dense_p:
                self.marks.setdefault(id(eqn), None)
            elif eqn.primitive is node_p:
                self._match(eqn, producers, origins, depth)

    def _count(self, operands: Sequence[Any], origins: dict) -> None:
        for v in operands:
            origin = origins.get(_var(v))
            if origin is not None:
                self.uses[origin.leaf] = self.uses.get(origin.leaf, 0) + 1

    def _scan(self, eqn: core.JaxprEqn, origins: dict, depth: int) -> None:
        body = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        inner: dict[core.Var, Origin] = {}
        consts = slice(0, n_consts)
        carry = slice(n_consts, n_consts + n_carry)
        xs = slice(n_consts + n_carry, len(eqn.invars))
        self._count(eqn.invars[carry], origins)  # a parameter as initial carry: not followed
        inner.update(_pass_on(eqn.invars[consts], body.invars[consts], origins, False))
        inner.update(_pass_on(eqn.invars[xs], body.invars[xs], origins, True))
        self.walk(body, inner, depth + 1)

    def _match(self, node: core.JaxprEqn, producers: dict, origins: dict, depth: int) -> None:
        """Search the pattern of the module docstring backwards from the node's tag."""
        name, var = node.params["name"], node.invars[0]
        search = _Search(name, producers, origins, depth)
        found = search.find(var, var.aval.ndim - 1, None, 0)
        if found is None:
            self.misses[name] = search.marks
            return
        site, marks = found
        self.sites[name] = site
        for mark in marks:
            self.marks[mark] = name
        self.misses[name] = [m for m in search.marks if m not in marks]


class _Search:
    """The backward pattern search from one node's tag (within one jaxpr)."""

    MAX_ADDS = 4  # bias and skip connections on the way to the dot_general

    def __init__(self, node: str, producers: dict, origins: dict, depth: int):
        self.node, self.producers, self.origins, self.depth = node, producers, origins, depth
        self.marks: list[int] = []  # every pcjax_dense mark seen

    def find(self, var: Any, axis: int, bias: Origin | None, adds: int, scale=1.0, bias_scale=1.0):
        """`(site, marks on the path)` for the dense layer that `var` (with the node's feature
        axis at `axis`, times the constant `scale`) is, up to skip connections; None if it is
        not one."""
        marks: list[int] = []
        while isinstance(var, core.Var) and var in self.producers:
            eqn = self.producers[var]
            kind = eqn.primitive.name
            if eqn.primitive is dense_p:
                marks.append(id(eqn))
                self.marks.append(id(eqn))
            elif kind == "transpose":
                axis = eqn.params["permutation"][axis]
            elif kind == "add":
                if adds >= self.MAX_ADDS:
                    return None
                for chain, other in (eqn.invars, eqn.invars[::-1]):
                    found = self._add(eqn, chain, other, axis, bias, adds, scale, bias_scale)
                    if found is not None:
                        return found[0], marks + found[1]
                return None
            elif kind == "mul":
                factor = _constant_scalar(eqn)
                if factor is None:
                    return None
                var, value = factor
                scale *= value
                continue
            elif kind == "dot_general":
                site = _dot_site(self.node, eqn, axis, bias, self.origins, self.depth)
                if site is None:
                    return None
                return site._replace(scale=scale, bias_scale=bias_scale), marks
            elif kind not in _SAME_VALUE:
                return None
            var = _operand_of(eqn, var)
        return None

    def _add(self, eqn, chain, other, axis, bias, adds, scale, bias_scale):
        """`chain + other`: `other` is the bias, or a skip connection (any value: with the
        weight used once, it cannot depend on it)."""
        if bias is None:
            found = _bias_operand(eqn, other, axis, self.producers, self.origins)
            if found is not None:
                return self.find(chain, axis, found, adds + 1, scale, scale)
        if not isinstance(chain, core.Var) or eqn.outvars[0].aval.shape != chain.aval.shape:
            return None  # the chain must carry the node's full shape
        return self.find(chain, axis, bias, adds + 1, scale, bias_scale)


def _constant_scalar(eqn: core.JaxprEqn) -> tuple[core.Var, float] | None:
    """`(other operand, c)` for `mul` by a scalar literal `c` (a Python number in the code)."""
    for other, factor in (eqn.invars, eqn.invars[::-1]):
        scalar = isinstance(factor, core.Literal) and np.ndim(factor.val) == 0
        if scalar and isinstance(other, core.Var) and other.aval.shape == eqn.outvars[0].aval.shape:
            return other, float(factor.val)
    return None


def _operand_of(eqn: core.JaxprEqn, output: Any) -> Any:
    """The operand of a value-preserving equation (`_SAME_VALUE`) that its `output` is (the
    mixed-precision marker has one output per operand)."""
    return (
        eqn.invars[list(eqn.outvars).index(output)]
        if eqn.primitive.multiple_results
        else eqn.invars[0]
    )


def _var(v: Any) -> Any:
    return v if isinstance(v, core.Var) else None


def _pass_on(outer: Sequence[Any], inner: Sequence[core.Var], origins: dict, sliced: bool | None):
    """Origins of a sub-jaxpr's inputs: those of the operands, one scan level deeper when
    `sliced` is not None."""
    passed = {}
    for o, i in zip(outer, inner):
        origin = origins.get(_var(o))
        if origin is not None:
            passed[i] = origin if sliced is None else Origin(origin.leaf, (*origin.sliced, sliced))
    return passed


def _bias_operand(eqn: core.JaxprEqn, operand: Any, axis: int, producers: dict, origins: dict):
    """The origin of `operand` of `add` if it is a 1-D parameter leaf laid along `axis`."""
    var = _var(operand)
    if var is None:
        return None
    if var in origins and var.aval.ndim == 1 and eqn.outvars[0].aval.ndim == 1:
        return origins[var]
    source, output = producers.get(var), var
    while source is not None and source.primitive.name in _SAME_VALUE:
        output = _var(_operand_of(source, output))
        source = producers.get(output)
    if (
        source is not None
        and source.primitive.name == "broadcast_in_dim"
        and _var(source.invars[0]) in origins
        and source.invars[0].aval.ndim == 1
        and tuple(source.params["broadcast_dimensions"]) == (axis,)
    ):
        return origins[source.invars[0]]
    return None


def _dot_site(name, eqn, axis, bias, origins, depth) -> DenseSite | None:
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r or len(contract_l) != 1:
        return None
    lhs, rhs = eqn.invars
    free_lhs = lhs.aval.ndim - 1
    # The weight's one free axis sits first in the output when it is the lhs, last when the rhs.
    for weight, other, w_axis, h_axis, at in (
        (rhs, lhs, contract_r[0], contract_l[0], free_lhs),
        (lhs, rhs, contract_l[0], contract_r[0], 0),
    ):
        origin = origins.get(_var(weight))
        if origin is None or weight.aval.ndim != 2 or axis != at or _var(other) is None:
            continue
        if bias is not None and bias.sliced != origin.sliced:
            return None
        return DenseSite(name, other, h_axis, origin, bias, w_axis == 1, depth)
    return None


def find_dense_sites(jaxpr: core.Jaxpr, leaf_of_input: Mapping[int, int]) -> dict[str, DenseSite]:
    """The dense sites of a traced function; `leaf_of_input[k]` is the parameter leaf that the
    jaxpr's `k`-th input is. Raises for a `pcjax.dense` that does not match."""
    finder = _Finder()
    origins = {jaxpr.invars[k]: Origin(leaf, ()) for k, leaf in leaf_of_input.items()}
    finder.walk(jaxpr, origins, 0)
    for name, marks in finder.misses.items():
        if marks and name not in finder.sites:
            raise ValueError(
                f"pcjax.fisher_statistics: the pcjax.dense layer of node {name!r} is not found "
                "as a dense layer of the parameters: pass the parameter arrays themselves, not "
                "transformed copies (the weight is not a leaf of `params`)."
            )
    if any(fed is None for fed in finder.marks.values()):
        raise ValueError(
            "pcjax.fisher_statistics: a pcjax.dense output is not tagged directly as a node; "
            "write pcjax.node(name, pcjax.dense(h, w, b))."
        )
    sites = {}
    for name, site in finder.sites.items():
        shared = [o for o in (site.weight, site.bias) if o is not None and finder.uses[o.leaf] > 1]
        if not shared:
            sites[name] = site
        elif name in finder.marks.values():
            raise ValueError(
                f"pcjax.fisher_statistics: a parameter of the pcjax.dense layer of node "
                f"{name!r} is also used elsewhere in the function; shared weights have no "
                "Kronecker factors here, use mode='matrix_free'."
            )
        # Unmarked layers with shared parameters are not dense layers here: left out.
    return sites


# --------------------------------------------------------------------------------------------
# Entry points.


def _leaf_of_input(params: Any, x: Any) -> dict[int, int]:
    """For `trace(fn, (params, x))`: traced input index -> index among the floating-point
    leaves of `params` (`eqx.filter(params, eqx.is_inexact_array)` order)."""
    n_params = len(jax.tree.leaves(params))
    mapping, traced, leaf = {}, 0, 0
    for position, value in enumerate(jax.tree.leaves((params, x))):
        if not is_array(value):
            continue  # static, not traced
        if position < n_params and jnp.issubdtype(value.dtype, jnp.inexact):
            mapping[traced] = leaf
            leaf += 1
        traced += 1
    return mapping


def _sites(fn: Callable[..., Any], params: Any, x: Any) -> tuple[Any, list[Any], dict]:
    """The traced program of `fn(params, x)`, its inputs, and its dense sites (found once per
    traced program)."""
    traced, arrays = trace(fn, (params, x))
    if "dense_sites" not in traced.memo:
        traced.memo["dense_sites"] = find_dense_sites(
            traced.closed.jaxpr, _leaf_of_input(params, x)
        )
    return traced, arrays, traced.memo["dense_sites"]


def dense_sites(fn: Callable[..., Any], params: Any, x: Any) -> dict[str, DenseSite]:
    """The dense sites of `fn(params, x)`, from a trace (nothing is computed)."""
    return _sites(fn, params, x)[2]


def dense_inputs(
    fn: Callable[..., Any], params: Any, x: Any, values: Mapping[str, Array] | None
) -> tuple[dict[str, DenseSite], dict[str, Array], dict[str, int]]:
    """The dense sites of `fn(params, x)`, each one's input $h$ at the given node values (the
    feature axis last, stacked along the enclosing scans as leading axes), and every node's
    number of enclosing scans."""
    traced, arrays, sites = _sites(fn, params, x)
    states = check_states(traced.nodes, {} if values is None else values)
    harvester = Harvester(traced.nodes, states, record=sites)
    harvester.run(traced.closed.jaxpr, traced.closed.consts, arrays)
    return sites, harvester.inputs, dict(traced.nodes.scan_depth)

"""Precisions (inverse covariances) of PC nodes: fixed arrays or learnable modules.

A node with error $e$ (last axis: the node's $d$ features) and precision $P$ contributes

$$F_i = \\tfrac12 \\sum_n e_n^\\top P e_n \\; - \\; \\tfrac{N}{2} \\log\\det P$$

to the energy, summed over its $N$ error vectors (batch and any other leading axes). The
$\\log\\det$ term is what makes precisions learnable:
$\\partial F_i / \\partial P = \\tfrac12 \\sum_n e_n e_n^\\top - \\tfrac{N}{2} P^{-1}$
vanishes at $P^{-1} = \\mathbb{E}[e e^\\top]$; without it the precision would collapse to zero.

Two kinds of precision values are accepted wherever pcjax takes `precision`:

- a plain positive array (scalar, or any shape that broadcasts to the node, e.g. `(features,)`):
  a *fixed* precision, multiplied elementwise; its log-det term is a constant and left out;
- a precision module, `ScalarPrecision`, `DiagonalPrecision` or `FullPrecision`: positive
  (definite) by construction through a log / Cholesky parameterisation, with the log-det term.
  Put the modules inside your parameters and pass `precision=lambda params: params[...]` to learn
  them with the parameters; pass them directly to keep them fixed. A plain array returned by
  such a function stays fixed (pcjax stops its gradient): without a log-det term, a gradient
  step would drive it to zero.

Dtypes, as in equinox: a module stores its parameters in `dtype=`, by default the dtype of the
given values if they are a floating-point array, else JAX's default float (float32, or float64
with `jax_enable_x64`: so a Python-number `value` with float64 on gives float64; pass
`dtype=jnp.float32` or a float32 array for a float32 model). `from_moments` keeps the dtype.
Whatever the precision's dtype, $P e$, $P^{-1} v$ and the log-det term come out in the dtype of
the errors, so a precision never changes the dtype of a model's energy or of its states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ._checks import concrete_value

Array = jax.Array


def _param_dtype(name: str, values, dtype: DTypeLike | None) -> np.dtype:
    """The dtype a module stores its parameters in: `dtype`, else that of floating `values`,
    else JAX's default float (float64 under `jax_enable_x64`)."""
    if dtype is None:
        given = getattr(values, "dtype", None)
        floating = given is not None and jnp.issubdtype(given, jnp.floating)
        dtype = given if floating else jnp.result_type(float)
    elif not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(
            f"pcjax.{name}: `dtype` must be a floating-point dtype, got {jnp.dtype(dtype)}."
        )
    return jax.dtypes.canonicalize_dtype(dtype)


def _like(result: Array, reference: Array) -> Array:
    """`result` in the dtype of `reference` when that is a floating-point (or complex) dtype."""
    dtype = jnp.result_type(reference)
    return result.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else result


def _check_positive(name: str, value: Array, floor: float) -> None:
    concrete = concrete_value(value)
    if concrete is not None and not (np.all(concrete > floor) and np.all(np.isfinite(concrete))):
        raise ValueError(
            f"pcjax.{name}: precision values must be finite and greater than the floor "
            f"{floor}; got a smallest value of {concrete.min()!r}."
        )


class Precision(eqx.Module):
    r"""Base class of the learnable precision modules (see the module docstring):
    [pcjax.ScalarPrecision][], [pcjax.DiagonalPrecision][] and [pcjax.FullPrecision][].

    **Arguments:**

    - `floor`: the lower bound $f \ge 0$ that $P$ stays above ($P - f I$ is positive
      definite); a static field.

    **Raises:** `NotImplementedError` from a method that a subclass does not implement.

    **Example:** every module weighs errors by $P$ and solves with $P^{-1}$.

    ```pycon
    >>> precision = pc.DiagonalPrecision(jnp.array([2.0, 4.0]))
    >>> isinstance(precision, pc.Precision)
    True
    >>> precision.weigh(jnp.ones(2)), precision.solve(jnp.ones(2))
    (Array([2., 4.], dtype=float32), Array([0.5 , 0.25], dtype=float32))

    ```
    """

    floor: float = eqx.field(static=True)

    def weigh(self, errors: Array) -> Array:
        """$P e$ for every error vector (the last axis)."""
        raise NotImplementedError

    def solve(self, vectors: Array) -> Array:
        """$P^{-1} v$ for every vector (the last axis)."""
        raise NotImplementedError

    def logdet(self) -> Array:
        """$\\log\\det P$ of one block (one element for a scalar precision)."""
        raise NotImplementedError

    def block_size(self) -> int:
        """How many error entries one $P$ block covers."""
        raise NotImplementedError

    def moments(self, errors: Array) -> Array:
        """Mean second moment of the errors in this precision's form (over the error vectors)."""
        raise NotImplementedError

    def from_moments(self, moments: Array, damping: float = 0.0) -> Precision:
        """The same kind of precision set to $(\\text{moments} + \\lambda I)^{-1}$."""
        raise NotImplementedError

    def dense(self, dim: int) -> Array:
        """$P$ as a dense `(dim, dim)` matrix, for a node with `dim` features."""
        raise NotImplementedError

    def fits(self, shape: tuple[int, ...]) -> str | None:
        """None if this precision fits a node of `shape`, else what is wrong."""
        return None


class DiagonalPrecision(Precision):
    """A precision per feature: $P = \\text{diag}(p)$, $p = \\text{floor} + e^{\\theta}$.

    `values` may have any shape that broadcasts to the node's trailing axes without enlarging
    them, e.g. `(features,)` for a `(batch, features)` node, `(28, 28)` for a `(batch, 28, 28)`
    image node, or `(1,)` (one value shared by every feature). Each value is one precision
    block: a value shared by $k$ entries of every error vector counts $k$ times in the log-det
    term, and `moments` averages $e^2$ over the entries it covers.

    **Arguments:**

    - `values`: the positive precisions $p$ (above `floor`), of the shapes above.
    - `floor`: $f \\ge 0$, a lower bound that $p$ never crosses; default 0.
    - `dtype`: of the parameters; None takes that of floating-point `values`, else JAX's
      default float.

    **Raises:** `ValueError` for values that are not finite and above `floor`, or a `dtype`
    that is not floating-point; [pcjax.energy][] raises one for values that do not fit the
    node.

    **Example** ([setup][examples-setup]): learn a precision per output feature.

    ```pycon
    >>> precision = {"y": pc.DiagonalPrecision(jnp.array([1.0, 4.0]))}
    >>> start = pc.forward_init(fn, params, x)
    >>> energy = pc.energy(fn, params, {"h": start["h"]}, x, {"y": y}, precision=precision)
    >>> precision["y"].values()
    Array([1., 4.], dtype=float32)

    ```
    """

    log_values: Array

    def __init__(self, values: Array, *, floor: float = 0.0, dtype: DTypeLike | None = None):
        values = jnp.asarray(values, dtype=_param_dtype(type(self).__name__, values, dtype))
        _check_positive(type(self).__name__, values, floor)
        self.floor = floor
        self.log_values = jnp.log(values - floor)

    def values(self) -> Array:
        """The precisions $p = f + e^{\\theta}$.

        **Returns:** an array of the shape of the `values` the module was made with.

        **Example:**

        ```pycon
        >>> pc.DiagonalPrecision(jnp.array([0.5, 2.0]), floor=0.1).values()
        Array([0.5, 2. ], dtype=float32)

        ```
        """
        return self.floor + jnp.exp(self.log_values)

    def weigh(self, errors):
        return _like(self.values() * errors, errors)

    def solve(self, vectors):
        return _like(vectors / self.values(), vectors)

    def logdet(self):
        return jnp.sum(jnp.log(self.values()))

    def block_size(self):
        return math.prod(self.log_values.shape)

    def moments(self, errors):
        nd = self.log_values.ndim
        lead = errors.ndim - nd
        shared = tuple(  # trailing axes along which one value covers several entries
            lead + i
            for i, (v, e) in enumerate(zip(self.log_values.shape, errors.shape[lead:]))
            if v == 1 and e != 1
        )
        squared = jnp.mean(errors**2, axis=shared, keepdims=True) if shared else errors**2
        return jnp.mean(squared, axis=tuple(range(lead)))

    def from_moments(self, moments, damping=0.0):
        values = 1.0 / (moments + damping) + self.floor
        return type(self)(values, floor=self.floor, dtype=self.log_values.dtype)

    def dense(self, dim):
        return jnp.diag(jnp.broadcast_to(self.values(), (dim,)))

    def fits(self, shape):
        own = self.log_values.shape
        trailing = tuple(shape[len(shape) - len(own) :]) if own else ()
        if len(own) > len(shape) or any(v not in (1, n) for v, n in zip(own, trailing)):
            return (
                f"a {type(self).__name__} of shape {own} (it must broadcast to the node's "
                "trailing axes without enlarging them)"
            )
        return None


class ScalarPrecision(DiagonalPrecision):
    """One precision for every entry of the node: $P = p I$, $p = \\text{floor} + e^{\\theta}$.

    A `DiagonalPrecision` whose values are a single scalar. A Python-number `value` gives JAX's
    default float (float64 with `jax_enable_x64`) unless `dtype` says otherwise.

    **Arguments:**

    - `value`: the precision $p > $ `floor`, a scalar; default 1.
    - `floor`: $f \\ge 0$, a lower bound that $p$ never crosses; default 0.
    - `dtype`: of the parameter; None: as for [pcjax.DiagonalPrecision][].

    **Raises:** `ValueError` for a `value` that is not a scalar, or not finite and above
    `floor`.

    **Example** ([setup][examples-setup]): the energy with its log-det term, for the 4
    entries of the output node. To learn it, store it in the parameters and pass
    `precision=lambda p: p["precision"]` to [pcjax.make_train_step][].

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> e = y - start["y"]
    >>> precision = {"y": pc.ScalarPrecision(2.0)}
    >>> F = pc.energy(fn, params, {"h": start["h"]}, x, {"y": y}, precision=precision)
    >>> bool(jnp.isclose(F, 0.5 * 2.0 * jnp.sum(e**2) - 4 / 2 * jnp.log(2.0)))
    True

    ```
    """

    def __init__(
        self, value: float | Array = 1.0, *, floor: float = 0.0, dtype: DTypeLike | None = None
    ):
        if jnp.shape(value) != ():
            raise ValueError(
                f"pcjax.ScalarPrecision: `value` must be a scalar, got shape {jnp.shape(value)}."
            )
        super().__init__(value, floor=floor, dtype=dtype)

    def value(self) -> Array:
        """The precision $p = f + e^{\\theta}$.

        **Returns:** a scalar array.

        **Example:**

        ```pycon
        >>> pc.ScalarPrecision(2.0).value()
        Array(2., dtype=float32)

        ```
        """
        return self.values()


class FullPrecision(Precision):
    """A full precision matrix over the node's last axis: $P = L L^\\top + \\text{floor}\\, I$.

    $L$ is lower triangular with a positive diagonal, stored as its strictly lower part and the
    log of its diagonal, so $P$ is symmetric positive definite for any parameter value.

    **Arguments:**

    - `matrix`: the symmetric positive definite precision matrix $P$, shape
      `(features, features)` for a node whose last axis has `features` entries.
    - `floor`: $f \\ge 0$; $P - f I$ stays positive definite; default 0.
    - `dtype`: of the parameters; None takes that of a floating-point `matrix`, else JAX's
      default float.

    **Raises:** `ValueError` for a `matrix` that is not square, not symmetric or not positive
    definite above the floor (naming its smallest eigenvalue).

    **Example** ([setup][examples-setup]): correlated output errors.

    ```pycon
    >>> P = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> precision = {"y": pc.FullPrecision(P)}
    >>> start = pc.forward_init(fn, params, x)
    >>> e = y - start["y"]
    >>> F = pc.energy(fn, params, {"h": start["h"]}, x, {"y": y}, precision=precision)
    >>> closed_form = 0.5 * jnp.sum((e @ P) * e) - jnp.log(jnp.linalg.det(P))  # N = 2 rows
    >>> bool(jnp.isclose(F, closed_form, rtol=1e-5))
    True

    ```
    """

    raw: Array  # strictly lower part of L, with log(diag L) on the diagonal

    def __init__(self, matrix: Array, *, floor: float = 0.0, dtype: DTypeLike | None = None):
        matrix = jnp.asarray(matrix, dtype=_param_dtype("FullPrecision", matrix, dtype))
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"pcjax.FullPrecision: `matrix` must be square, got shape {matrix.shape}."
            )
        concrete = concrete_value(matrix)
        if concrete is not None:
            asymmetry = float(np.max(np.abs(concrete - concrete.T), initial=0.0))
            if asymmetry > 1e-6 * max(1.0, float(np.max(np.abs(concrete), initial=0.0))):
                raise ValueError(
                    f"pcjax.FullPrecision: `matrix` must be symmetric; max |M - M^T| is "
                    f"{asymmetry:.3g}."
                )
            smallest = float(np.linalg.eigvalsh(concrete.astype(np.float64)).min())
            if not smallest > floor:
                raise ValueError(
                    f"pcjax.FullPrecision: `matrix` must be positive definite (above the floor "
                    f"{floor}); its smallest eigenvalue is {smallest:.3g}."
                )
        eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
        chol = jnp.linalg.cholesky(matrix - floor * eye)
        self.floor = floor
        self.raw = jnp.tril(chol, -1) + jnp.diag(jnp.log(jnp.diag(chol)))

    def cholesky(self) -> Array:
        return jnp.tril(self.raw, -1) + jnp.diag(jnp.exp(jnp.diag(self.raw)))

    def matrix(self) -> Array:
        """The precision matrix $P = L L^\\top + f I$.

        **Returns:** a `(features, features)` symmetric positive definite array.

        **Example:**

        ```pycon
        >>> P = jnp.array([[2.0, 0.5], [0.5, 1.0]])
        >>> pc.FullPrecision(P).matrix().round(3)
        Array([[2. , 0.5],
               [0.5, 1. ]], dtype=float32)

        ```
        """
        chol = self.cholesky()
        return chol @ chol.T + self.floor * jnp.eye(chol.shape[0], dtype=chol.dtype)

    def weigh(self, errors):
        return _like(errors @ self.matrix(), errors)  # P is symmetric: row vectors times P

    def solve(self, vectors):
        flat = vectors.reshape(-1, vectors.shape[-1]).T
        if self.floor == 0.0:
            chol = self.cholesky()
            y = jax.scipy.linalg.solve_triangular(chol, flat, lower=True)
            solved = jax.scipy.linalg.solve_triangular(chol.T, y, lower=False)
        else:
            solved = jnp.linalg.solve(self.matrix(), flat)
        return _like(solved.T.reshape(vectors.shape), vectors)

    def logdet(self):
        if self.floor == 0.0:
            return 2.0 * jnp.sum(jnp.diag(self.raw))
        return jnp.linalg.slogdet(self.matrix())[1]

    def block_size(self):
        return self.raw.shape[0]

    def moments(self, errors):
        flat = errors.reshape(-1, errors.shape[-1])
        return flat.T @ flat / flat.shape[0]

    def from_moments(self, moments, damping=0.0):
        dim = moments.shape[0]
        covariance = moments + damping * jnp.eye(dim, dtype=moments.dtype)
        inverse = jnp.linalg.inv(covariance)
        inverse = 0.5 * (inverse + inverse.T) + self.floor * jnp.eye(dim, dtype=moments.dtype)
        return FullPrecision(inverse, floor=self.floor, dtype=self.raw.dtype)

    def dense(self, dim):
        return self.matrix()

    def fits(self, shape):
        if not shape or shape[-1] != self.raw.shape[0]:
            return f"a FullPrecision of size {self.raw.shape}"
        return None


# ---------------------------------------------------------------- dispatch on the two kinds


def weigh(precision, errors: Array) -> Array:
    """$P e$ for a precision module or a fixed elementwise array, in the errors' dtype."""
    if isinstance(precision, Precision):
        return precision.weigh(errors)
    return _like(precision * errors, errors)


def solve(precision, vectors: Array) -> Array:
    """$P^{-1} v$ for a precision module or a fixed elementwise array, in the vectors' dtype."""
    if isinstance(precision, Precision):
        return precision.solve(vectors)
    return _like(vectors / precision, vectors)


def logdet_term(precision, errors: Array) -> Array | float:
    """$-\\tfrac{N}{2} \\log\\det P$ for a module ($N$ error vectors), in the errors' dtype;
    0 for fixed arrays."""
    if not isinstance(precision, Precision):
        return 0.0
    count = errors.size // precision.block_size()
    return _like(-0.5 * count * precision.logdet(), errors)


def dense_matrix(precision, dim: int, dtype) -> Array:
    """$P$ as a `(dim, dim)` matrix over a node's last axis (1 when `precision` is None)."""
    if precision is None:
        return jnp.eye(dim, dtype=dtype)
    if isinstance(precision, Precision):
        return precision.dense(dim).astype(dtype)
    precision = jnp.asarray(precision, dtype)
    if precision.ndim > 1:
        raise ValueError(
            "pcjax: a dense Fisher needs a scalar, per-feature or module precision; got a fixed "
            f"precision of shape {precision.shape}."
        )
    return jnp.diag(jnp.broadcast_to(precision, (dim,)))


# ---------------------------------------------------------------- closed-form estimates


def _modules(where: str, precision: Any, errors: Any) -> None:
    """Raise unless `precision` maps node names to precision modules and `errors` is a dict
    with an entry for each of them."""
    if not isinstance(precision, Mapping):
        raise TypeError(
            f"{where}: `precision` must be a dict mapping node names to precision modules "
            f"(ScalarPrecision, DiagonalPrecision, FullPrecision), got {type(precision).__name__}."
        )
    for key, module in precision.items():
        if not isinstance(module, Precision):
            raise TypeError(
                f"{where}: node {key!r} has a fixed precision ({type(module).__name__}) in "
                "`precision`, not a precision module; only ScalarPrecision, DiagonalPrecision "
                "and FullPrecision learn (wrap the values, e.g. pcjax.DiagonalPrecision(values), "
                "to learn them)."
            )
    if not isinstance(errors, Mapping):
        raise TypeError(
            f"{where}: `errors` must be a dict mapping node names to prediction errors, got "
            f"{type(errors).__name__}."
        )
    unknown = sorted(set(precision) - set(errors))
    if unknown:
        raise ValueError(f"{where}: no errors for node(s) {unknown}.")


def error_moments(precision: Mapping[str, Precision], errors: Mapping[str, Array]) -> dict:
    """Mean second moments $\\mathbb{E}[e e^\\top]$ of each node's errors, in the form of its
    precision module (a scalar, per-feature values or a matrix).

    **Arguments:**

    - `precision`: dict from node names to precision modules.
    - `errors`: dict of the nodes' prediction errors (e.g. [pcjax.prediction_errors][]).

    **Returns:** a dict from the names of `precision` to the moments: a scalar for a
    [pcjax.ScalarPrecision][], an array of the values' shape for a
    [pcjax.DiagonalPrecision][], a `(features, features)` matrix for a [pcjax.FullPrecision][].

    **Example:**

    ```pycon
    >>> errors = {"y": jnp.array([[1.0, 2.0], [3.0, 0.0]])}
    >>> pc.error_moments({"y": pc.DiagonalPrecision(jnp.ones(2))}, errors)["y"]
    Array([5., 2.], dtype=float32)
    >>> pc.error_moments({"y": pc.ScalarPrecision(1.0)}, errors)["y"]
    Array(3.5, dtype=float32)

    ```

    **Raises:** `TypeError` if a value of `precision` is not a precision module; `ValueError`
    if `errors` lacks one of its nodes."""
    _modules("pcjax.error_moments", precision, errors)
    return {name: p.moments(errors[name]) for name, p in precision.items()}


def update_precision_ema(
    precision: Mapping[str, Precision],
    errors: Mapping[str, Array],
    ema: Mapping[str, Array] | None = None,
    *,
    decay: float = 0.99,
    damping: float = 1e-4,
) -> tuple[dict[str, Precision], dict[str, Array]]:
    """Closed-form precision estimate from a running average of the errors' second moments.

    $$M \\leftarrow \\beta M + (1 - \\beta)\\, \\mathbb{E}_{\\text{batch}}[e e^\\top], \\qquad
    P = (M + \\lambda I)^{-1}.$$

    **Arguments:**

    - `precision`: dict of precision modules to re-estimate (its kinds are kept).
    - `errors`: the nodes' prediction errors, e.g. [pcjax.prediction_errors][] at relaxed states.
    - `ema`: the running moments from the previous call; None starts them at this batch's.
    - `decay`: $\\beta$ in [0, 1); `damping`: $\\lambda \\ge 0$.

    **Returns:** `(precision, ema)`, the new precisions and running moments.

    **Raises:** `TypeError` if a value of `precision` is not a precision module (a plain
    array is a fixed precision); `ValueError` for `decay`, `damping` out of range or a node
    without errors.

    **Example:** with `decay=0` the estimate is the inverse of this batch's moments.

    ```pycon
    >>> errors = {"y": jnp.array([[1.0, 0.2], [-1.0, -0.2]])}
    >>> precision, ema = pc.update_precision_ema(
    ...     {"y": pc.DiagonalPrecision(jnp.ones(2))}, errors, decay=0.0, damping=0.0
    ... )
    >>> [round(v, 3) for v in precision["y"].values().tolist()]
    [1.0, 25.0]
    >>> [round(v, 3) for v in ema["y"].tolist()]
    [1.0, 0.04]

    ```
    """
    name = "pcjax.update_precision_ema"
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"pcjax.update_precision_ema: `decay` must be in [0, 1), got {decay}.")
    if damping < 0:
        raise ValueError(f"pcjax.update_precision_ema: `damping` must be >= 0, got {damping}.")
    _modules(name, precision, errors)
    moments = {k: p.moments(errors[k]) for k, p in precision.items()}
    if ema is None:
        ema = moments
    else:
        ema = {k: decay * ema[k] + (1.0 - decay) * moments[k] for k in moments}
    new = {k: p.from_moments(ema[k], damping) for k, p in precision.items()}
    return new, ema


# ---------------------------------------------------------------- natural-gradient flow


def _capped_step(step_size, largest: Array, safeguard: float) -> Array:
    """$\\min(\\eta, c / (\\lambda_{\\max} - 1))$ where $\\lambda_{\\max} > 1$, else $\\eta$."""
    over = largest > 1.0
    bound = safeguard / jnp.where(over, largest - 1.0, 1.0)
    return jnp.where(over, jnp.minimum(step_size, bound), step_size)


def _log_smallest_factor(dtype) -> float:
    r"""$\tfrac12 \log$ of the dtype's smallest normal number: the exponential step shrinks
    no eigenvalue of $P - fI$ by more than this factor in one step (about $10^{-19}$ in
    float32), where the exact geodesic would underflow to 0."""
    return 0.5 * math.log(float(jnp.finfo(dtype).tiny))


def _natural_diagonal(module: DiagonalPrecision, moments, step_size, method, safeguard):
    dtype = jnp.result_type(module.log_values, moments)
    log_excess = module.log_values.astype(dtype)  # log(p - floor)
    ratio = jnp.exp(log_excess) * moments.astype(dtype)  # (p - floor) s, per element
    if method == "exponential":
        log_factor = jnp.maximum(step_size * (1.0 - ratio), _log_smallest_factor(dtype))
    else:
        log_factor = jnp.log1p(_capped_step(step_size, ratio, safeguard) * (1.0 - ratio))
    new = (log_excess + log_factor).astype(module.log_values.dtype)
    return eqx.tree_at(lambda m: m.log_values, module, new)


def _natural_full(module: FullPrecision, moments, step_size, method, safeguard):
    dtype = jnp.result_type(module.raw, moments)
    chol = module.cholesky().astype(dtype)  # P - floor I = L L^T
    eye = jnp.eye(chol.shape[0], dtype=dtype)
    whitened = chol.T @ moments.astype(dtype) @ chol
    whitened = 0.5 * (whitened + whitened.T)
    if method == "exponential":
        # L exp(.) L^T = (L B)(L B)^T with B = V exp(eta (1 - mu) / 2): its Cholesky factor from a
        # QR of (L B)^T, never forming the product, so that even a step that shrinks P by e^-100
        # keeps an exact, positive-definite factor.
        eigenvalues, vectors = jnp.linalg.eigh(whitened)
        exponent = jnp.maximum(step_size * (1.0 - eigenvalues), _log_smallest_factor(dtype))
        root = vectors * jnp.exp(0.5 * exponent)
        r = jnp.linalg.qr((chol @ root).T, mode="r")
        new = r.T * jnp.sign(jnp.diag(r))  # lower, with a positive diagonal
    else:
        step = _capped_step(step_size, jnp.linalg.eigvalsh(whitened)[-1], safeguard)
        middle = eye + step * (eye - whitened)  # eigenvalues in [1 - safeguard, 1 + step]
        new = chol @ jnp.linalg.cholesky(0.5 * (middle + middle.T))  # lower, positive diagonal
    raw = jnp.tril(new, -1) + jnp.diag(jnp.log(jnp.diag(new)))
    return eqx.tree_at(lambda m: m.raw, module, raw.astype(module.raw.dtype))


def update_precision_natural(
    precision: Mapping[str, Precision],
    errors: Mapping[str, Array],
    *,
    step_size: float | Array,
    method: str = "euler",
    safeguard: float = 0.5,
) -> dict[str, Precision]:
    """One step of the natural-gradient flow of the energy on each node's precision.

    With $S = \\mathbb{E}_{\\text{batch}}[e e^\\top]$ (the module's `moments`) and the energy
    per error vector $F(P) = \\tfrac12 \\operatorname{tr}(P S) - \\tfrac12 \\log\\det P$, the
    gradient on symmetric matrices is $\\nabla F = \\tfrac12 (S - P^{-1})$. The Fisher metric of
    a Gaussian's precision is $g_P(A, B) = \\tfrac12 \\operatorname{tr}(P^{-1} A P^{-1} B)$, i.e.
    $G = \\tfrac12 P^{-1} \\otimes P^{-1}$ on $\\operatorname{vec} P$, with inverse
    $2 P \\otimes P$; so the natural gradient is $2 P (\\nabla F) P = P S P - P$ and its
    descent flow is the rule $\\dot P = P - P S P$ of Millidge (2020), with fixed point
    $P^{-1} = S$. One Euler step (`method="euler"`, the default) is

    $$P \\leftarrow P + \\eta\\,(P - P S P)
      = L\\,\\big(I + \\eta\\,(I - L^\\top S L)\\big)\\,L^\\top, \\qquad P = L L^\\top,$$

    elementwise $p \\leftarrow p + \\eta\\,(p - p^2 s)$ for `ScalarPrecision` and
    `DiagonalPrecision` (each element is its own block, so per-feature values of any shape work).
    The middle factor has eigenvalues $1 + \\eta (1 - \\mu_i)$, $\\mu_i \\ge 0$ those of
    $L^\\top S L$ (of $P S$), so the step keeps $P$ positive definite iff
    $\\eta\\,(\\mu_{\\max} - 1) < 1$. **Safeguard:** the step used is
    $\\min(\\eta,\\ c / (\\mu_{\\max} - 1))$ when $\\mu_{\\max} > 1$ ($c$ = `safeguard`; per element
    for the diagonal kinds, one step per matrix for `FullPrecision`), so every eigenvalue of
    $L^{-1} P_{\\text{new}} L^{-\\top}$ lies in $[1 - c, 1 + \\eta]$: no direction of $P$ shrinks by
    more than the factor $1 - c$ in a step, and the update is applied to the Cholesky factor
    ($L \\leftarrow L\\, \\operatorname{chol}(\\cdot)$, well conditioned whatever $P$'s condition
    number). It only shortens steps, so the fixed point is unchanged; near it
    ($\\mu_i \\approx 1$) the full step $\\eta$ is taken.

    `method="exponential"` takes the geodesic of the same (affine-invariant) metric instead,
    $P \\leftarrow L \\exp\\!\\big(\\eta\\,(I - L^\\top S L)\\big) L^\\top$, positive definite
    for any $\\eta$ and equal to the Euler step to first order; for the diagonal kinds it is
    $\\log p \\leftarrow \\log p + \\eta (1 - p s)$, a gradient step of size $2\\eta$ on
    $\\log p$ (of $F$ per element). It can overshoot far when $P$ is much too large
    ($\\mu_{\\max} \\gg 1$: a factor $e^{-\\eta \\mu_{\\max}}$), which the capped Euler step
    cannot. **Underflow floor:** each exponent $\\eta (1 - \\mu_i)$ is clamped below at
    $\\tfrac12 \\log t$, $t$ the smallest normal number of the computation's dtype, so that one
    step shrinks no eigenvalue of $P - fI$ by more than the factor $\\sqrt t$ (about
    $1.1 \\times 10^{-19}$ in float32, $1.5 \\times 10^{-154}$ in float64); the exact step
    would round to $P = 0$ (log-det $-\\infty$) in float32 once $\\eta (\\mu_{\\max} - 1) > 87$,
    e.g. errors of standard deviation 30 at $P = 1$, $\\eta = 0.5$. A shrinking step starts
    from $\\mu > 1$, so the result stays above $\\sqrt t\\, S^{-1}$ in those directions and the
    flow recovers from there (it only ever shortens the step, so the fixed point is unchanged).

    **Floor:** a module stores $P = P_0 + f I$ with $P_0 = L L^\\top$ (or $e^\\theta$) and floor
    $f$. The flow is applied to $P_0$, the part the module parameterises, so $P$ stays above the
    floor and the fixed point is $P = S^{-1} + f I$, as for `from_moments(S)`. With $f = 0$
    (the default) the step is exactly the natural-gradient step of $F$ above.

    **Arguments:**

    - `precision`: dict of precision modules to update (kinds, dtypes and floors are kept).
    - `errors`: the nodes' prediction errors, e.g. [pcjax.prediction_errors][] at relaxed states.
    - `step_size`: $\\eta > 0$ (a number or a scalar array).
    - `method`: `"euler"` (default, with the safeguard) or `"exponential"`.
    - `safeguard`: $c \\in (0, 1)$, the largest fraction by which a step may shrink $P$ (Euler).

    **Returns:** the new precisions, a dict of modules of the same kinds.

    **Raises:** `TypeError` if a value of `precision` is not a precision module; `ValueError`
    for an unknown `method`, a step size that is not positive, a `safeguard` outside
    $(0, 1)$ or a node without errors.

    **Example:** repeated steps approach the fixed point $P = \\mathbb{E}[e^2]^{-1} = 4$.

    ```pycon
    >>> errors = {"y": jnp.array([[0.5], [-0.5]])}
    >>> precision = {"y": pc.ScalarPrecision(1.0)}
    >>> for _ in range(20):
    ...     precision = pc.update_precision_natural(precision, errors, step_size=0.5)
    >>> precision["y"].value().round(3)
    Array(4., dtype=float32)

    ```
    """
    name = "pcjax.update_precision_natural"
    concrete = concrete_value(step_size)
    if concrete is not None and (
        concrete.ndim != 0 or not (np.isfinite(concrete) and concrete > 0)
    ):
        raise ValueError(f"{name}: `step_size` must be a finite number > 0, got {step_size!r}.")
    if method not in ("euler", "exponential"):
        raise ValueError(f"{name}: `method` must be 'euler' or 'exponential', got {method!r}.")
    if not 0.0 < safeguard < 1.0:
        raise ValueError(f"{name}: `safeguard` must be in (0, 1), got {safeguard!r}.")
    _modules(name, precision, errors)
    new = {}
    for key, module in precision.items():
        shape = tuple(jnp.shape(errors[key]))
        problem = module.fits(shape)
        if problem is not None:
            raise ValueError(f"{name}: node {key!r} has errors of shape {shape}, not {problem}.")
        step = _natural_full if isinstance(module, FullPrecision) else _natural_diagonal
        new[key] = step(module, module.moments(errors[key]), step_size, method, safeguard)
    return new

r"""The conjugate-gradient iteration pcjax uses: Newton-CG on the states (`pcjax._solvers`) and
the matrix-free natural-gradient solve (`pcjax._natural`).

It solves $M u = b$ for a symmetric operator $M$ given by its products `matvec`, from $u_0 = 0$:

$$\alpha_k = \frac{r_k^\top r_k}{p_k^\top M p_k},\quad u_{k+1} = u_k + \alpha_k p_k,\quad
r_{k+1} = r_k - \alpha_k M p_k,\quad p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}
{r_k^\top r_k} p_k.$$

The vectors are lists of arrays. With `axes` (one entry per array: the axis along which it holds
independent problems, or None for an array shared by all of them) the inner products are taken
per problem, so that each sample of a batch gets its own step lengths; without it there is one
problem. Inner products accumulate in at least float32. A problem stops (keeps its iterate) when
its residual norm squared is at most `bound`, at an exact solve, and where it meets
non-positive curvature $p^\top M p \le 0$ (an indefinite $M$: the step so far is kept).

`early_stop=False` runs exactly `maxiter` iterations in a `lax.scan` (stopped problems make no
further change: a fixed cost under `jit`, reverse-differentiable); `early_stop=True` runs a
`lax.while_loop` that ends once every problem has stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Vector = list[Array]


def dots(a: Vector, b: Vector, axes: Sequence[int | None] | None) -> Array:
    r"""Inner products $\langle a, b \rangle$: one per problem along `axes` (shape
    `(problems,)`), or one over everything when `axes` is None (shape `(1,)`)."""
    total = jnp.zeros((1,), jnp.float32)
    for index, (u, v) in enumerate(zip(a, b)):
        wide = jnp.promote_types(u.dtype, jnp.float32)
        product = u.astype(wide) * v.astype(wide)
        axis = None if axes is None else axes[index]
        if axis is None:
            total = total + jnp.sum(product).reshape(1)
        else:
            product = jnp.moveaxis(product, axis, 0)
            total = total + product.reshape(product.shape[0], -1).sum(axis=1)
    return total


def axpy(c: Array, x: Vector, y: Vector, axes: Sequence[int | None] | None) -> Vector:
    r"""$y + c\,x$, with `c` one scalar per problem (as `dots` returns them). An array shared by
    the problems (axis None) takes the first problem's coefficient; callers that have several
    problems and shared arrays must not use per-problem coefficients."""
    out = []
    for index, (u, v) in enumerate(zip(x, y)):
        axis = None if axes is None else axes[index]
        if axis is None or c.shape[0] == 1:
            scale = c[0]
        else:
            shape = [1] * u.ndim
            shape[axis] = c.shape[0]
            scale = c.reshape(shape)
        out.append(v + (scale * u).astype(u.dtype))
    return out


def _ratio(num: Array, den: Array, active: Array) -> Array:
    # num / den where active, 0 elsewhere (the inner where keeps 0/0 out of gradients)
    return jnp.where(active, num / jnp.where(active, den, 1), 0)


def conjugate_gradients(
    matvec: Callable[[Vector], Vector],
    b: Vector,
    maxiter: Any,
    bound: Any,
    *,
    axes: Sequence[int | None] | None = None,
    early_stop: bool = False,
    unroll: int | bool = 1,
) -> tuple[Vector, Array, Array]:
    r"""Solve $M u = b$ by conjugate gradients (see the module docstring).

    **Arguments:**

    - `matvec`: $p \mapsto M p$ on lists of arrays shaped like `b`.
    - `b`: the right-hand side.
    - `maxiter`: the most iterations (a Python int with `early_stop=False`).
    - `bound`: a problem stops once $r^\top r \le$ `bound` (a scalar or one per problem; a
      negative bound never stops it).
    - `axes`: per-array problem axes (see the module docstring), or None for one problem.
    - `early_stop`: a `lax.while_loop` that ends when every problem has stopped, instead of a
      fixed-length `lax.scan`.
    - `unroll`: unrolling of the `lax.scan`.

    **Returns:** `(u, iterations, rr)`: the solution, the iterations made (the loop's count)
    and each problem's final $r^\top r$ (shape `(problems,)`).
    """
    rr = dots(b, b, axes)
    active = (rr > bound) & (rr > 0)
    zeros = [jnp.zeros_like(v) for v in b]

    def iteration(carry):
        u, r, p, rr, active, k = carry
        mp = matvec(p)
        curvature = dots(p, mp, axes)
        active = active & (curvature > 0)  # non-positive curvature: keep the step so far
        alpha = _ratio(rr, curvature, active)
        u, r = axpy(alpha, p, u, axes), axpy(-alpha, mp, r, axes)
        rr_next = dots(r, r, axes)
        beta = _ratio(rr_next, rr, active)
        p = axpy(beta, p, r, axes)
        # Stop at the bound, and at an exact solve (rr_next = 0 would make the next beta 0/0).
        rr = jnp.where(active, rr_next, rr)
        active = active & (rr_next > bound) & (rr_next > 0)
        return u, r, p, rr, active, k + 1

    start = (zeros, b, b, rr, active, jnp.zeros((), jnp.int32))
    if early_stop:
        carry = jax.lax.while_loop(lambda c: (c[5] < maxiter) & jnp.any(c[4]), iteration, start)
    else:
        carry, _ = jax.lax.scan(
            lambda c, _: (iteration(c), None), start, None, length=maxiter, unroll=unroll
        )
    u, _, _, rr, _, k = carry
    return u, k, rr

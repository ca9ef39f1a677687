"""The natural-gradient flow on precisions, `pcjax.update_precision_natural`: the flow
$\\dot P = P - P S P$ is the natural gradient of $F$ under the Gaussian's Fisher metric (checked
against a dense Fisher), its fixed point is $P^{-1} = S$, the safeguard keeps $P$ positive
definite where the plain Euler step would not, each kind matches its closed form, bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcjax as pc


def normal(seed, shape):
    """Standard normal draws from NumPy (quicker to start than jax.random), as a JAX array."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def spd(seed, dim, shift=0.5):
    a = normal(seed, (dim, dim))
    return a @ a.T / dim + shift * jnp.eye(dim)


def samples(seed, covariance, count):
    """`count` error vectors whose mean second moment is exactly `covariance`."""
    dim = covariance.shape[0]
    z = normal(seed, (count, dim))
    z = z @ jnp.linalg.inv(jnp.linalg.cholesky(z.T @ z / count)).T  # whitened: mean zz^T = I
    return z @ jnp.linalg.cholesky(covariance).T


def duplication(dim):
    """D with vec(P) = D vech(P) for symmetric P (vech: the lower triangle, row by row)."""
    rows, cols = np.tril_indices(dim)
    d = np.zeros((dim * dim, rows.size))
    for k, (i, j) in enumerate(zip(rows, cols)):
        d[i * dim + j, k] = d[j * dim + i, k] = 1.0
    return jnp.asarray(d)


def whitened_eigenvalues(p, s):
    """Eigenvalues of P^{1/2} S P^{1/2} (those of P S), ascending."""
    chol = np.linalg.cholesky(np.asarray(p))
    return np.linalg.eigvalsh(chol.T @ np.asarray(s) @ chol)


@pytest.mark.x64
def test_flow_is_the_natural_gradient_under_a_dense_fisher():
    """On symmetric matrices, coordinates theta = vech(P). The Gaussian N(0, P^{-1}) has Fisher
    D^T (1/2 P^{-1} (x) P^{-1}) D in theta; the natural gradient -G^{-1} dF/dtheta of
    F = 1/2 mean e^T P e - 1/2 log det P, mapped back by D, is vec(P - P S P)."""
    dim = 4
    p = spd(0, dim)
    e = normal(1, (7, dim)) @ spd(2, dim)
    s = e.T @ e / e.shape[0]
    dup = duplication(dim)
    theta = jnp.asarray(np.asarray(p)[np.tril_indices(dim)])

    def energy(theta):
        matrix = (dup @ theta).reshape(dim, dim)
        return (
            0.5 * jnp.mean(jnp.einsum("ni,ij,nj->n", e, matrix, e))
            - 0.5 * jnp.linalg.slogdet(matrix)[1]
        )

    np.testing.assert_allclose((dup @ theta).reshape(dim, dim), p, rtol=0)
    inverse = jnp.linalg.inv(p)
    fisher = dup.T @ (0.5 * jnp.kron(inverse, inverse)) @ dup
    # The Fisher of a natural parameter is the Hessian of the log-partition; F is linear in P
    # but for -1/2 log det P, so jax.hessian(F) is an independent check of the formula.
    np.testing.assert_allclose(
        jax.jit(jax.hessian(energy))(theta), fisher, rtol=2e-14
    )  # measured 1.4e-15
    natural = -jnp.linalg.solve(fisher, jax.jit(jax.grad(energy))(theta))
    flow = p - p @ s @ p
    rtol, atol = 2e-14, 1e-14  # measured 1.5e-15 and 1.3e-15 (abs) at worst
    np.testing.assert_allclose((dup @ natural).reshape(dim, dim), flow, rtol=rtol, atol=atol)
    # The same on all d^2 entries (G = 1/2 P^{-1} (x) P^{-1}, invertible there): the result is
    # symmetric, i.e. in the range of D, which is why the two routes agree.
    full = -jnp.linalg.solve(0.5 * jnp.kron(inverse, inverse), (0.5 * (s - inverse)).ravel())
    np.testing.assert_allclose(full.reshape(dim, dim), flow, rtol=rtol, atol=atol)
    # pcjax's Euler step is P + eta * natural direction (uncapped here: eta (mu_max - 1) < 1/2).
    step = 0.02
    assert step * (whitened_eigenvalues(p, s).max() - 1.0) < 0.5
    new = pc.update_precision_natural({"v": pc.FullPrecision(p)}, {"v": e}, step_size=step)
    direction = (new["v"].matrix() - p) / step
    np.testing.assert_allclose(direction, flow, rtol=4e-14, atol=2e-13)  # measured 2.4e-14 abs


def kinds(dim):
    return {
        "scalar": pc.ScalarPrecision(1.5),
        "diagonal": pc.DiagonalPrecision(jnp.linspace(0.5, 2.0, dim)),
        "full": pc.FullPrecision(spd(3, dim)),
    }


def closed_form_step(p, s, step):
    """One Euler step by hand (numpy): P + eta (P - P S P), elementwise for vectors/scalars."""
    p, s = np.asarray(p), np.asarray(s)
    return p + step * (p - p @ s @ p) if p.ndim == 2 else p + step * (p - p * p * s)


def values(module):
    return module.matrix() if isinstance(module, pc.FullPrecision) else module.values()


@pytest.mark.x64
def test_each_kind_matches_its_closed_form_step():
    dim = 3
    e = normal(4, (9, dim)) * jnp.array([0.6, 1.0, 1.3])
    expected_moments = {
        "scalar": np.mean(np.asarray(e) ** 2),
        "diagonal": np.mean(np.asarray(e) ** 2, axis=0),
        "full": np.asarray(e).T @ np.asarray(e) / 9,
    }
    precision = kinds(dim)
    step = 0.05  # small enough that the safeguard stays off for all three
    new = pc.update_precision_natural(precision, dict.fromkeys(precision, e), step_size=step)
    for kind, module in precision.items():
        assert type(new[kind]) is type(module)
        expected = closed_form_step(values(module), expected_moments[kind], step)
        rtol = 2e-15  # measured 0 (scalar), 2.1e-16 (diagonal), 3.7e-16 (full)
        np.testing.assert_allclose(values(new[kind]), expected, rtol=rtol)


@pytest.mark.x64
def test_per_feature_diagonal_precision_of_any_shape():
    """Values shaped like the node's trailing axes: the moments average the leading axes only."""
    e = normal(5, (6, 2, 3)) * jnp.array([0.5, 1.0, 2.0])
    per_pixel = pc.DiagonalPrecision(jnp.full((2, 3), 0.8))
    per_channel = pc.DiagonalPrecision(jnp.array([0.5, 1.0, 1.5]))
    new = pc.update_precision_natural(
        {"a": per_pixel, "b": per_channel}, {"a": e, "b": e}, step_size=0.02
    )
    squared = np.asarray(e) ** 2
    np.testing.assert_allclose(
        new["a"].values(), closed_form_step(0.8, squared.mean(axis=0), 0.02), rtol=2e-15
    )  # measured 0
    np.testing.assert_allclose(
        new["b"].values(),
        closed_form_step(np.array([0.5, 1.0, 1.5]), squared.mean(axis=(0, 1)), 0.02),
        rtol=2e-15,
    )  # measured 0
    assert new["a"].values().shape == (2, 3) and new["b"].values().shape == (3,)


@pytest.mark.x64
@pytest.mark.parametrize("method", ["euler", "exponential"])
def test_fixed_point_is_the_inverse_second_moment(method):
    """Iterating on errors with fixed moments S: P^{-1} -> S (per kind: the mean square, the
    per-feature mean squares, the matrix), from P far on both sides; with a floor f the fixed
    point is S^{-1} + f I, as for `from_moments`."""
    dim = 4
    covariance = spd(6, dim, shift=0.1)
    e = samples(7, covariance, 32)
    np.testing.assert_allclose(e.T @ e / 32, covariance, rtol=5e-15)  # measured 4.4e-16
    s = np.asarray(covariance)
    targets = {"scalar": np.trace(s) / dim, "diagonal": np.diag(s), "full": s}
    precision = kinds(dim)
    precision["floored"] = pc.FullPrecision(5.0 * jnp.eye(dim), floor=0.3)
    update = jax.jit(
        lambda p: pc.update_precision_natural(p, dict.fromkeys(p, e), step_size=0.5, method=method)
    )
    for _ in range(300):
        precision = update(precision)
    for kind, target in targets.items():
        fitted = values(precision[kind])
        fitted = jnp.linalg.inv(fitted) if kind == "full" else 1.0 / fitted
        np.testing.assert_allclose(fitted, target, rtol=3e-14)  # measured 3.2e-15 (full), 4.1e-16
    floored = jnp.linalg.inv(s) + 0.3 * np.eye(dim)
    np.testing.assert_allclose(
        precision["floored"].matrix(), floored, rtol=1e-13
    )  # measured 3.0e-15
    refit = precision["floored"].from_moments(covariance)
    np.testing.assert_allclose(
        precision["floored"].matrix(), refit.matrix(), rtol=1e-13
    )  # measured 1.7e-15


def test_fixed_point_from_fresh_gaussian_samples():
    """On fresh minibatches from N(0, Sigma) the iterates fluctuate around Sigma^{-1}: the average
    of P over the second half of the run is close to Sigma^{-1} (float32, the default path)."""
    dim, batch, steps = 3, 64, 800
    covariance = jnp.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    draws = normal(8, (steps, batch, dim))
    chol = jnp.linalg.cholesky(covariance)

    def body(module, z):
        e = z @ chol.T
        module = pc.update_precision_natural({"v": module}, {"v": e}, step_size=0.02)["v"]
        return module, module.matrix()

    _, path = jax.lax.scan(body, pc.FullPrecision(jnp.eye(dim)), draws)
    mean = jnp.mean(path[steps // 2 :], axis=0)
    error = float(jnp.linalg.norm(mean - jnp.linalg.inv(covariance)) / jnp.linalg.norm(mean))
    assert path.dtype == jnp.float32
    assert error < 0.03, error  # measured 0.012 (0.006 to 0.012 with seeds 1, 2, 3)


@pytest.mark.x64
def test_safeguard_keeps_positive_definiteness_where_the_plain_step_would_not():
    p = jnp.diag(jnp.array([4.0, 1.0, 0.5]))
    covariance = jnp.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.8]])
    e = samples(9, covariance, 16)
    step, safeguard = 0.5, 0.5
    mu = whitened_eigenvalues(p, covariance)
    naive = closed_form_step(p, covariance, step)
    assert np.linalg.eigvalsh(naive).min() < 0  # the plain Euler step leaves the cone
    new = pc.update_precision_natural(
        {"v": pc.FullPrecision(p)}, {"v": e}, step_size=step, safeguard=safeguard
    )["v"].matrix()
    capped = safeguard / (mu.max() - 1.0)
    expected = closed_form_step(p, covariance, capped)
    # measured 4.4e-16 (abs; entries that are exactly 0 come out as 1e-18)
    np.testing.assert_allclose(new, expected, rtol=1e-14, atol=5e-15)
    # the step stopped where the smallest eigenvalue of P^{-1/2} P_new P^{-1/2} is 1 - c:
    relative = whitened_eigenvalues(np.linalg.inv(p), new)
    np.testing.assert_allclose(relative.min(), 1.0 - safeguard, rtol=2e-15)  # measured 2.2e-16
    assert np.linalg.eigvalsh(new).min() > 0
    # the diagonal kinds cap per element: only the elements that would go negative slow down.
    d = pc.DiagonalPrecision(jnp.diag(p))
    moments = np.mean(np.asarray(e) ** 2, axis=0)
    ratio = np.diag(p) * moments
    steps = np.where(
        ratio > 1.0, np.minimum(step, safeguard / np.maximum(ratio - 1.0, 1e-300)), step
    )
    assert np.any(np.diag(p) + step * (np.diag(p) - np.diag(p) ** 2 * moments) < 0)
    assert np.any(steps == step) and np.any(steps < step)
    new_d = pc.update_precision_natural({"v": d}, {"v": e}, step_size=step)["v"].values()
    expected = np.diag(p) + steps * (np.diag(p) - np.diag(p) ** 2 * moments)
    np.testing.assert_allclose(new_d, expected, rtol=2e-15)  # measured 1.7e-16
    assert np.all(new_d > 0)


@pytest.mark.x64
def test_exponential_method_is_the_affine_invariant_geodesic():
    """P^{1/2} expm(eta (I - P^{1/2} S P^{1/2})) P^{1/2} with the symmetric square root, by
    numpy; positive definite at a step where the Euler step would leave the cone."""
    p = np.asarray(spd(10, 3))
    covariance = np.asarray(spd(11, 3, shift=2.0))
    e = samples(12, jnp.asarray(covariance), 16)
    step = 2.0
    w, v = np.linalg.eigh(p)
    root = (v * np.sqrt(w)) @ v.T
    mu, u = np.linalg.eigh(root @ covariance @ root)
    expected = root @ ((u * np.exp(step * (1.0 - mu))) @ u.T) @ root
    assert np.linalg.eigvalsh(closed_form_step(p, covariance, step)).min() < 0
    new = pc.update_precision_natural(
        {"v": pc.FullPrecision(p)}, {"v": e}, step_size=step, method="exponential"
    )["v"].matrix()
    np.testing.assert_allclose(new, expected, rtol=3e-14)  # measured 2.7e-15
    d = pc.DiagonalPrecision(jnp.array([0.5, 2.0]))
    new_d = pc.update_precision_natural(
        {"v": d}, {"v": e[:, :2]}, step_size=step, method="exponential"
    )["v"].values()
    s = np.mean(np.asarray(e[:, :2]) ** 2, axis=0)
    expected_d = np.array([0.5, 2.0]) * np.exp(step * (1 - np.array([0.5, 2.0]) * s))
    np.testing.assert_allclose(new_d, expected_d, rtol=2e-15)  # measured 2.0e-16
    # A precision 30 times too large: the step shrinks it by e^-59 to e^-99, a middle factor of
    # condition number e^40 = 2e17 that no Cholesky in float64 can take; the QR form stays exact:
    # P_new = 30 exp(I - 30 S) (P commutes with S here), eigenvalues from the factor's SVD.
    mu = np.linalg.eigvalsh(30.0 * covariance)
    assert np.exp(mu.max() - mu.min()) > 1e17
    new = pc.update_precision_natural(
        {"v": pc.FullPrecision(30.0 * np.eye(3))}, {"v": e}, step_size=1.0, method="exponential"
    )["v"]
    eigenvalues = np.sort(np.linalg.svd(np.asarray(new.cholesky()), compute_uv=False) ** 2)
    expected = np.sort(30.0 * np.exp(1.0 - mu))
    np.testing.assert_allclose(eigenvalues, expected, rtol=5e-13)  # measured 3.6e-14


def test_float32_kinds_dtypes_and_floor_are_kept_under_jit():
    e = normal(13, (8, 3))
    precision = {
        "s": pc.ScalarPrecision(2.0, floor=0.1, dtype=jnp.float32),
        "d": pc.DiagonalPrecision(jnp.ones(3), floor=0.5),
        "f": pc.FullPrecision(jnp.eye(3), floor=0.2),
    }
    new = jax.jit(lambda p, e, eta: pc.update_precision_natural(p, e, step_size=eta))(
        precision, dict.fromkeys(precision, e), jnp.float32(0.3)
    )
    for key, module in precision.items():
        assert type(new[key]) is type(module) and new[key].floor == module.floor
        leaves = jax.tree.leaves(new[key])
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert float(new["s"].value()) > 0.1 and float(new["d"].values().min()) > 0.5
    assert float(jnp.linalg.eigvalsh(new["f"].matrix()).min()) > 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_size": 0.0}, "`step_size` must be a finite number > 0, got 0.0"),
        ({"step_size": -0.1}, "`step_size` must be a finite number > 0"),
        ({"step_size": float("nan")}, "`step_size` must be a finite number > 0"),
        ({"step_size": jnp.ones(2)}, "`step_size` must be a finite number > 0"),
        ({"step_size": 0.1, "method": "rk4"}, "`method` must be 'euler' or 'exponential'"),
        ({"step_size": 0.1, "safeguard": 1.0}, "`safeguard` must be in (0, 1), got 1.0"),
        ({"step_size": 0.1, "safeguard": 0.0}, "`safeguard` must be in (0, 1)"),
    ],
)
def test_bad_arguments(kwargs, message):
    precision = {"v": pc.ScalarPrecision(1.0)}
    with pytest.raises(ValueError, match=re.escape(message)):
        pc.update_precision_natural(precision, {"v": jnp.ones((2, 3))}, **kwargs)


def test_bad_nodes_are_named():
    e = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=re.escape("no errors for node(s) ['h1']")):
        pc.update_precision_natural(
            {"h0": pc.ScalarPrecision(), "h1": pc.ScalarPrecision()}, {"h0": e}, step_size=0.1
        )
    with pytest.raises(TypeError, match="node 'h0' has a fixed precision \\(ArrayImpl\\)"):
        pc.update_precision_natural({"h0": jnp.ones(3)}, {"h0": e}, step_size=0.1)
    with pytest.raises(
        ValueError,
        match=re.escape("node 'h0' has errors of shape (4, 3), not a FullPrecision of size (2, 2)"),
    ):
        pc.update_precision_natural({"h0": pc.FullPrecision(jnp.eye(2))}, {"h0": e}, step_size=0.1)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "node 'h0' has errors of shape (4, 3), not a DiagonalPrecision of shape (2,)"
        ),
    ):
        pc.update_precision_natural(
            {"h0": pc.DiagonalPrecision(jnp.ones(2))}, {"h0": e}, step_size=0.1
        )

"""Variants users of other PC libraries expect: Monte Carlo PC (Langevin inference) and
output nudging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pcjax as pc


def test_langevin_inference_samples_the_linear_gaussian_posterior():
    """Monte Carlo PC: chains of Langevin steps on the energy of z -> v (linear-Gaussian)
    end at samples whose mean and covariance are the closed-form posterior's."""
    chains = 4000
    a = jnp.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]])  # z (2) -> v (3)
    prior_mean, prior_precision, noise_precision = jnp.array([0.5, -0.5]), 2.0, 4.0
    v = jnp.array([0.3, -0.2, 1.0])

    def model(params, batch):
        z = pc.node("z", jnp.broadcast_to(prior_mean, (batch.shape[0], 2)))
        return pc.node("v", z @ a)

    batch = jnp.zeros((chains, 0))
    precision = {"z": prior_precision, "v": noise_precision}
    start = {"z": jnp.zeros((chains, 2))}
    states, info = pc.infer(
        model,
        None,
        start,
        batch,
        {"v": jnp.broadcast_to(v, (chains, 3))},
        steps=1500,
        optimizer=pc.langevin(0.01, jax.random.PRNGKey(3)),
        precision=precision,
    )
    assert not bool(info.diverged)
    posterior_precision = prior_precision * jnp.eye(2) + noise_precision * a @ a.T
    covariance = jnp.linalg.inv(posterior_precision)
    mean = covariance @ (prior_precision * prior_mean + noise_precision * a @ v)
    samples = states["z"]
    standard_error = jnp.sqrt(jnp.diag(covariance) / chains)
    assert jnp.all(jnp.abs(samples.mean(0) - mean) < 4 * standard_error)
    np.testing.assert_allclose(jnp.cov(samples.T), covariance, rtol=0.1, atol=0.01)
    # Temperature 0 is plain gradient descent: the chains collapse onto the posterior mode.
    modes, _ = pc.infer(
        model,
        None,
        start,
        batch,
        {"v": jnp.broadcast_to(v, (chains, 3))},
        steps=1500,
        optimizer=pc.langevin(0.01, jax.random.PRNGKey(3), temperature=0.0),
        precision=precision,
    )
    np.testing.assert_allclose(modes["z"][0], mean, rtol=1e-4)

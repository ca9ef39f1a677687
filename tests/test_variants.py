"""Variants users of other PC libraries expect: Monte Carlo PC (Langevin inference) and
output nudging."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_error

import pcjax as pc
from pcjax import nn


def test_langevin_inference_samples_the_linear_gaussian_posterior():
    """Monte Carlo PC: chains of Langevin steps on the energy of z -> v (linear-Gaussian)
    end at samples whose mean and covariance are the closed-form posterior's; at temperature 0
    the same steps are gradient descent and collapse onto the posterior mode."""
    chains, steps = 4000, 600
    a = jnp.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]])  # z (2) -> v (3)
    prior_mean, prior_precision, noise_precision = jnp.array([0.5, -0.5]), 2.0, 4.0
    v = jnp.array([0.3, -0.2, 1.0])

    def model(params, batch):
        z = pc.node("z", jnp.broadcast_to(prior_mean, (batch.shape[0], 2)))
        return pc.node("v", z @ a)

    batch = jnp.zeros((chains, 0))
    precision = {"z": prior_precision, "v": noise_precision}
    start = {"z": jnp.zeros((chains, 2))}
    observed = {"v": jnp.broadcast_to(v, (chains, 3))}

    @jax.jit
    def sample(temperature):
        # The slowest mode relaxes by a factor (1 - 0.01 * 2)^600 = 5e-6.
        return pc.infer(
            model,
            None,
            start,
            batch,
            observed,
            precision=precision,
            key=jax.random.PRNGKey(3),
            solver=pc.GradientDescent(steps, pc.langevin(0.01, temperature=temperature)),
        )

    states, info = sample(1.0)
    assert not bool(info.diverged)
    posterior_precision = prior_precision * jnp.eye(2) + noise_precision * a @ a.T
    covariance = jnp.linalg.inv(posterior_precision)
    mean = covariance @ (prior_precision * prior_mean + noise_precision * a @ v)
    samples = states["z"]
    standard_error = jnp.sqrt(jnp.diag(covariance) / chains)
    assert jnp.all(jnp.abs(samples.mean(0) - mean) < 4 * standard_error)
    # The O(step) discretisation bias of the unadjusted sampler is about 0.01 * 10 / 2 = 5%
    # in the stiffest direction; sampling error about sqrt(2 / 4000) = 2%.
    np.testing.assert_allclose(jnp.cov(samples.T), covariance, rtol=0.1, atol=0.01)
    modes, _ = sample(0.0)
    np.testing.assert_allclose(modes["z"][0], mean, rtol=1e-4)


def nudged_gradient(model, x, y, nudging, beta):
    """The gradient estimate of one nudged training step (SGD with step 1, summed over batch)."""
    new, info = _nudged_step(model, x, y, jnp.asarray(beta), nudging)
    assert int(info.inference_steps) < 4000
    return jax.tree.map(lambda a, b: a - b, model, new)


@eqx.filter_jit  # beta is traced: one compile per nudging mode serves both betas
def _nudged_step(model, x, y, beta, nudging):
    optimizer = optax.sgd(1.0)
    rule = pc.Nudged(pc.GradientDescent(4000, step_size=0.2, tol=1e-11), beta, nudging)
    step = pc.make_train_step(nn.call, rule, optimizer, mean_over_batch=False)
    new, _, info = step(model, optimizer.init(model), x, {"h1": y})
    return new, info


@pytest.mark.x64  # the estimates' bias is measured at tight equilibria (tol 1e-11)
@pytest.mark.parametrize("energy", [None, pc.cross_entropy])
def test_nudging_estimates_approach_backprop(energy):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    model = nn.MLP([4, 6, 3], key=k1, activation=jnp.tanh, output_energy=energy)
    x = jax.random.normal(k2, (8, 4))
    if energy is None:
        y = jax.random.normal(k3, (8, 3))
        loss = lambda m: 0.5 * jnp.sum((y - nn.call(m, x)) ** 2)  # noqa: E731
    else:
        y = jax.nn.one_hot(jax.random.randint(k3, (8,), 0, 3), 3)
        loss = lambda m: optax.softmax_cross_entropy(nn.call(m, x), y).sum()  # noqa: E731
    reference = eqx.filter_grad(loss)(model)
    errors = {
        (nudging, beta): rel_error(nudged_gradient(model, x, y, nudging, beta), reference)
        for nudging in ["positive", "negative", "centred"]
        for beta in [0.1, 0.01]
    }
    for nudging in ["positive", "negative", "centred"]:
        assert errors[nudging, 0.01] < errors[nudging, 0.1], errors
    assert errors["centred", 0.1] < min(errors["positive", 0.1], errors["negative", 0.1]), errors
    assert errors["centred", 0.01] < 1e-3 and errors["positive", 0.01] < 0.05, errors


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "both"}, "`mode` must be one of"),
        ({"mode": "centred", "beta": 0.0}, "`beta` must be a positive number"),
    ],
)
def test_nudging_arguments_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        pc.Nudged(pc.GradientDescent(2), **options)

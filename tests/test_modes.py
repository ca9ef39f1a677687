"""The three modes on a small real data set (the UCI 8x8 digits bundled with scikit-learn):
discriminative, generative (learned prior on the top latent) and conditional generative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_mlp, mlp, rel_error

import pcjax as pc
from pcjax.datasets import load_digits


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (
        jnp.asarray(data.x_train.reshape(-1, 64)),
        jnp.asarray(data.y_train),
        jnp.asarray(data.x_test.reshape(-1, 64)),
        jnp.asarray(data.y_test),
    )


def fit(fn, params, batches, optimizer, epochs, solver):
    """Train with pcjax.make_train_step (learning at the equilibrium `solver` reaches) over
    `batches` (a list of (x, observed)); return params and the mean energy of each epoch."""
    step = jax.jit(pc.make_train_step(fn, pc.Equilibrium(solver), optimizer))
    opt_state = optimizer.init(params)
    history = []
    for _ in range(epochs):
        energies = []
        for x, observed in batches:
            params, opt_state, info = step(params, opt_state, x, observed)
            energies.append(float(info.energy))
        history.append(np.mean(energies))
    assert np.all(np.isfinite(history))
    return params, history


def batches_of(x, observed, size=64):
    n = (len(x) // size) * size
    return [
        (x[i : i + size], {k: v[i : i + size] for k, v in observed.items()})
        for i in range(0, n, size)
    ]


def test_discriminative_training_and_classification_by_inference(digits):
    x_train, y_train, x_test, y_test = digits
    params = init_mlp(jax.random.PRNGKey(0), [64, 64, 10], jnp.float32)
    batches = batches_of(x_train, {"h1": jax.nn.one_hot(y_train, 10)})
    params, history = fit(
        mlp, params, batches, optax.adam(3e-3), 25, pc.GradientDescent(10, step_size=0.1)
    )
    assert history[-1] < 0.2 * history[0]
    feedforward = jnp.argmax(mlp(params, x_test), -1)
    accuracy = float(jnp.mean(feedforward == y_test))
    assert accuracy > 0.93, accuracy

    # Classification by inference: the label node is free, started at zero; at equilibrium
    # all errors vanish, so it settles on the feedforward prediction.
    @jax.jit  # one compile, not one per eager operation
    def classify(params, x):
        start = pc.forward_init(mlp, params, x)
        start["h1"] = jnp.zeros_like(start["h1"])
        initial = pc.energy(mlp, params, start, x)
        solver = pc.GradientDescent(200, step_size=0.2)
        states, info = pc.infer(mlp, params, start, x, solver=solver)
        return initial, states, info

    initial, states, info = classify(params, x_test)
    assert float(info.energy) < 1e-4 * float(initial)
    assert float(jnp.mean(jnp.argmax(states["h1"], -1) == feedforward)) == 1.0


def generative(params, batch):
    """Top latent z with a learned prior mean, predicting a hidden layer, predicting pixels.

    The input `batch` is an empty array of shape (batch_size, 0): it only carries the batch
    size, so that jit sees a shape rather than a traced number."""
    z = pc.node("z", jnp.broadcast_to(params["prior"], (batch.shape[0], params["prior"].shape[0])))
    h = pc.node("h", jnp.tanh(z) @ params["w1"] + params["b1"])
    return pc.node("pixels", jnp.tanh(h) @ params["w2"] + params["b2"])


def test_generative_model_learns_prior_and_reconstructs(digits):
    x_train, _, x_test, _ = digits
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    params = {
        "prior": jnp.zeros(10),
        "w1": jax.random.normal(k1, (10, 32)) * 0.3,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 64)) * 0.2,
        "b2": jnp.zeros(64),
    }
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    batches = [
        (jnp.zeros((64, 0)), observed) for _, observed in batches_of(x_train, {"pixels": x_train})
    ]
    trained, history = fit(
        generative, params, batches, optax.adam(3e-3), 30, pc.GradientDescent(30, step_size=0.1)
    )
    assert history[-1] < 0.5 * history[0], history

    # The prior mean is learned: its energy term 1/2 ||z - prior||^2 is minimal at the mean of
    # the relaxed latents over the data (the maximum-likelihood prior), which it should reach.
    @jax.jit  # one compile, not one per eager operation
    def relaxed_latents(params, empty, pixels):
        latent = pc.forward_init(generative, params, empty)
        del latent["pixels"]
        relaxed, _ = pc.infer(
            generative,
            params,
            latent,
            empty,
            {"pixels": pixels},
            solver=pc.GradientDescent(30, step_size=0.1),
        )
        return relaxed

    mean_z = relaxed_latents(trained, jnp.zeros((len(x_train), 0)), x_train)["z"].mean(0)
    assert float(jnp.linalg.norm(mean_z)) > 0.1  # a non-trivial target (measured 0.17)
    assert rel_error(trained["prior"], mean_z) < 0.05  # measured 0.016 (1.0 before training)

    @jax.jit  # compiled once, run for the trained and the initial parameters
    def reconstruction_error(params):
        empty = jnp.zeros((len(x_test), 0))
        latent = pc.forward_init(generative, params, empty)
        del latent["pixels"]
        observed = {"pixels": x_test}
        states, _ = pc.infer(
            generative,
            params,
            latent,
            empty,
            observed,
            solver=pc.GradientDescent(100, step_size=0.1),
        )
        errors = pc.prediction_errors(generative, params, states, empty, observed)
        return jnp.mean(errors["pixels"] ** 2)

    assert float(reconstruction_error(trained)) < 0.5 * float(reconstruction_error(params))


def conditional(params, labels):
    h = pc.node("h", labels @ params[0][0] + params[0][1])
    return pc.node("image", jnp.tanh(h) @ params[1][0] + params[1][1])


def test_conditional_generation_by_inference(digits):
    x_train, y_train, _, _ = digits
    params = init_mlp(jax.random.PRNGKey(2), [10, 32, 64], jnp.float32)
    onehot = jax.nn.one_hot(y_train, 10)
    batches = [
        (lab, obs)
        for lab, obs in zip(
            [onehot[i : i + 64] for i in range(0, 1408, 64)],
            [{"image": x_train[i : i + 64]} for i in range(0, 1408, 64)],
        )
    ]
    params, history = fit(
        conditional, params, batches, optax.adam(1e-2), 30, pc.GradientDescent(10)
    )
    assert history[-1] < 0.5 * history[0]

    # Generate: the label is the input, every node (the image included) is free, from zero.
    @jax.jit  # one compile, not one per eager operation
    def generate(params, labels):
        start = pc.forward_init(conditional, params, labels)
        start = {k: jnp.zeros_like(v) for k, v in start.items()}
        return pc.infer(
            conditional,
            params,
            start,
            labels,
            solver=pc.GradientDescent(2000, optax.adam(0.02), tol=1e-4),
        )

    states, info = generate(params, jnp.eye(10, dtype=jnp.float32))
    assert not bool(info.diverged) and float(info.energy) < 1e-6
    class_means = jnp.stack([x_train[y_train == c].mean(0) for c in range(10)])
    distances = jnp.linalg.norm(states["image"][:, None, :] - class_means[None], axis=-1)
    assert jnp.argmin(distances, axis=1).tolist() == list(range(10))

"""Field evaluations to the equilibrium certificate `relative_grad_norm <= 1e-3` (a JVP/VJP pair
counted as 2), for gradient descent, `pcjax.Backtracking`, `pcjax.GaussNewton` and
`pcjax.LevenbergMarquardt`, on the stiff linear case of `tests/test_least_squares.py`
(precisions 1, 30, 900) and its tanh network.

Run: `python benchmarks/least_squares_counts.py` (CPU, about a minute). Each solver's smallest
`steps` that reaches the certificate is found by doubling then bisection; its
`InferInfo.evaluations` is printed ("> N": not reached within the largest budget tried).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import pcjax as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_least_squares as cases

TARGET, LIMIT = 1e-3, 4096


def stiff_problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (2, 3)), "w2": jax.random.normal(k2, (3, 2)) / 2}
    x, y = jax.random.normal(k3, (cases.B, 2)), jax.random.normal(k4, (cases.B, 2))
    start = {"h": jnp.zeros((cases.B, 3))}
    return cases.stiff_net, params, start, x, {"y": y}, cases.STIFF_PREC


def tanh_problem():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {
        "w1": jax.random.normal(k[0], (3, 5)),
        "w2": jax.random.normal(k[1], (5, 5)) / 2,
        "w3": jax.random.normal(k[2], (5, 2)),
    }
    x, y = jax.random.normal(k[3], (cases.B, 3)), jax.random.normal(k[4], (cases.B, 2))
    m = jax.random.normal(k[5], (5, 5)) / 3
    precision = {
        "h1": pc.FullPrecision(jnp.eye(5) + m @ m.T),
        "h2": pc.DiagonalPrecision(jnp.array([0.5, 1.0, 2.0, 4.0, 8.0])),
    }
    start = pc.forward_init(cases.tanh_net, params, x)
    del start["y"]
    return cases.tanh_net, params, start, x, {"y": y}, precision


def evaluations_to_certificate(problem, make_solver):
    fn, params, start, x, observed, precision = problem

    def run(steps):
        solver = make_solver(steps)
        _, info = jax.jit(
            lambda: pc.infer(fn, params, start, x, observed, solver=solver, precision=precision)
        )()
        ok = bool(info.relative_grad_norm <= TARGET) and not bool(info.diverged)
        return ok, int(info.evaluations)

    high = 1
    while not run(high)[0]:
        if high >= LIMIT:
            return f"> {run(high)[1]}"
        high *= 2
    low = high // 2  # fails (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if run(middle)[0] else (middle, high)
    return str(run(high)[1])


SOLVERS = {
    "GradientDescent(step_size=2e-3)": lambda n: pc.GradientDescent(n, step_size=2e-3),
    "GradientDescent(step_size=0.05)": lambda n: pc.GradientDescent(n, step_size=0.05),
    "Backtracking(step_size=0.1)": lambda n: pc.Backtracking(n, step_size=0.1),
    "GaussNewton(cg_steps=3)": lambda n: pc.GaussNewton(n, cg_steps=3),
    "GaussNewton(cg_steps=10)": lambda n: pc.GaussNewton(n, cg_steps=10),
    "LevenbergMarquardt(cg_steps=3)": lambda n: pc.LevenbergMarquardt(n, cg_steps=3),
    "LevenbergMarquardt(cg_steps=10)": lambda n: pc.LevenbergMarquardt(n, cg_steps=10),
}

if __name__ == "__main__":
    problems = {"stiff linear (P = 1, 30, 900)": stiff_problem(), "tanh 3-5-5-2": tanh_problem()}
    for case, problem in problems.items():
        for name, make in SOLVERS.items():
            print(f"{case:30s} {name:34s} {evaluations_to_certificate(problem, make)}")

"""Release 0.3 (issue 29): pcjax 0.1's keyword API is gone, with errors that show the composed
call replacing it; no module imports another lazily to dodge an import cycle; one helper reads
concrete hyperparameters.

Ground truths: gradient descent on a hand-written energy (`jax.grad`), the fixed-prediction
field written out by hand, and the package's own source (parsed with `ast`).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pcjax as pc
from pcjax._checks import concrete_value

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pcjax"


def net(params, x):
    h = pc.node("h", x @ params["w1"])
    return pc.node("y", jnp.tanh(h) @ params["w2"])


def energy_by_hand(params, h, x, y):
    """1/2 ||h - x W1||^2 + 1/2 ||y - tanh(h) W2||^2, summed over the batch."""
    return 0.5 * jnp.sum((h - x @ params["w1"]) ** 2) + 0.5 * jnp.sum(
        (y - jnp.tanh(h) @ params["w2"]) ** 2
    )


@pytest.fixture(scope="module")
def problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(29), 4)
    params = {"w1": jax.random.normal(k1, (3, 5)) / 2, "w2": jax.random.normal(k2, (5, 2)) / 2}
    x, y = jax.random.normal(k3, (4, 3)), jax.random.normal(k4, (4, 2))
    states = {"h": pc.forward_init(net, params, x)["h"]}
    return params, x, y, states


# ---------------------------------------------------------------- removed keywords of infer


def test_infer_steps_keyword_is_refused_with_the_composed_call(problem):
    params, x, y, states = problem
    with pytest.raises(TypeError) as caught:
        pc.infer(net, params, states, x, {"y": y}, steps=20)
    message = str(caught.value)
    assert "`steps=` were removed in pcjax 0.3" in message
    assert "solver=pcjax.GradientDescent(20)" in message


def _suggested_call(message: str) -> str:
    """The `pcjax.infer(...)` expression an error message shows."""
    match = re.search(r"compose the call instead: (pcjax\.infer\(.*\)\)) \(see", message)
    assert match, message
    return match.group(1)


def _run_suggestion(problem, **removed):
    """Call infer with the removed keywords, then run the call its message suggests."""
    params, x, y, states = problem
    with pytest.raises(TypeError, match=r"removed in pcjax 0\.3") as caught:
        pc.infer(net, params, states, x, {"y": y}, **removed)
    scope = {"pcjax": pc, "fn": net, "params": params, "states": states, "x": x}
    return eval(_suggested_call(str(caught.value)), {**scope, "observed": {"y": y}})


def test_the_suggested_call_computes_what_the_keywords_did(problem):
    """`steps=3, step_size=0.2`: three gradient steps of size 0.2 on the hand-written energy."""
    params, x, y, states = problem
    relaxed, info = _run_suggestion(problem, steps=3, step_size=0.2)
    h = states["h"]
    for _ in range(3):
        h = h - 0.2 * jax.grad(energy_by_hand, 1)(params, h, x, y)
    np.testing.assert_allclose(relaxed["h"], h, rtol=1e-6, atol=1e-7)  # measured 6e-8 (f32)
    assert int(info.steps) == 3


def test_the_suggested_call_keeps_fixed_predictions(problem):
    """`fixed_predictions=True` becomes `pcjax.fixed_predictions(fn)`: the output's prediction
    and Jacobian stay at the feedforward pass, field e_h - J(h_ff)^T e_y(h_ff)."""
    params, x, y, states = problem
    relaxed, _ = _run_suggestion(problem, steps=2, step_size=0.5, fixed_predictions=True)
    h_ff = states["h"]
    e_y = y - jnp.tanh(h_ff) @ params["w2"]  # frozen
    back = (e_y @ params["w2"].T) * (1 - jnp.tanh(h_ff) ** 2)
    h = h_ff
    for _ in range(2):
        h = h - 0.5 * ((h - x @ params["w1"]) - back)
    np.testing.assert_allclose(relaxed["h"], h, rtol=1e-6, atol=1e-7)  # measured 3e-8 (f32)


def test_every_removed_keyword_is_named_and_mapped(problem):
    params, x, y, states = problem
    optimizer = optax.sgd(0.1)
    with pytest.raises(TypeError) as caught:
        pc.infer(
            net, params, states, x, {"y": y}, steps=5, optimizer=optimizer, tol=1e-3,
            record_energy=True, unroll=2, raise_on_divergence=True, precondition=True,
        )  # fmt: skip
    call = _suggested_call(str(caught.value))
    assert call == (
        "pcjax.infer(pcjax.preconditioned(fn), params, states, x, observed, solver=pcjax."
        "GradientDescent(5, optimizer, tol=0.001, record_energy=True, unroll=2, throw=True))"
    )
    for name in ("optimizer", "tol", "record_energy", "unroll", "raise_on_divergence"):
        assert f"`{name}=`" in str(caught.value)


def test_an_unknown_keyword_is_not_mistaken_for_a_removed_one(problem):
    params, x, y, states = problem
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['stepz'\]"):
        pc.infer(net, params, states, x, {"y": y}, solver=pc.GradientDescent(2), stepz=2)


def test_param_grads_fixed_predictions_keyword_is_refused(problem):
    params, x, y, states = problem
    with pytest.raises(TypeError, match=r"removed in pcjax 0\.3.*pcjax\.fixed_predictions\(fn\)"):
        pc.param_grads(net, params, states, x, {"y": y}, fixed_predictions=True)


# ---------------------------------------------------------------- removed train_step


def test_train_step_is_gone_and_names_make_train_step():
    assert "train_step" not in pc.__all__
    assert not hasattr(pc, "train_step")
    with pytest.raises(AttributeError, match=r"removed in pcjax 0\.3.*pcjax\.make_train_step"):
        pc.train_step  # noqa: B018
    with pytest.raises(ImportError):
        from pcjax import train_step  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        pc.no_such_name  # noqa: B018


def test_a_mismatched_optimizer_state_names_make_train_step(problem):
    """The message named the removed `pcjax.train_step`."""
    params, x, y, _ = problem
    step = pc.make_train_step(net, pc.Equilibrium(pc.GradientDescent(2)), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"^pcjax\.make_train_step: `opt_state` does not"):
        step(params, optax.sgd(0.1, momentum=0.9).init(params), x, {"y": y})


def test_version_and_changelog():
    assert pc.__version__ == "0.3.0"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    # The newest released version (an "Unreleased" section may sit above it).
    versions = re.findall(r"^## (\d\S*)", changelog, re.MULTILINE)
    assert versions[0] == "0.3.0"


# ---------------------------------------------------------------- the removed API is not used

REMOVED_NAME = re.compile(r"\b(?:pc|pcjax)\.train_step\b")  # (a notebook's own train_step is fine)
REMOVED_INFER_KEYWORDS = {
    "steps", "step_size", "optimizer", "tol", "record_energy", "unroll", "raise_on_divergence",
    "fixed_predictions", "precondition",
}  # fmt: skip


def _removed_api_calls(source: str) -> list[str]:
    """infer / param_grads calls with keywords removed in 0.3, in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        keywords = {k.arg for k in node.keywords}
        if name == "infer" and keywords & REMOVED_INFER_KEYWORDS:
            found.append(f"line {node.lineno}: infer({sorted(keywords)})")
        if name == "param_grads" and "fixed_predictions" in keywords:
            found.append(f"line {node.lineno}: param_grads(fixed_predictions=)")
    return found


def _page_text(page: Path) -> str:
    """A docs page, without the migration guide's section on pcjax 0.1 (which names the
    removed API on purpose: its old -> new table and the removed name's error)."""
    text = page.read_text()
    if page.name == "coming-from.md":
        text = re.sub(r"## From pcjax 0\.1\n.*?(?=\n## )", "", text, flags=re.S)
    return text


def _code_of_pages_notebooks_and_scripts():
    """(where, Python source) of every code block of the docs and README, every notebook code
    cell, every benchmark script and every module of the package (docstrings included)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", _page_text(page), re.S)):
            yield f"{page.relative_to(ROOT)} block {i}", block
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                lines = "".join(cell["source"]).splitlines()
                code = "\n".join(line for line in lines if not line.startswith(("%", "!")))
                yield f"{notebook.relative_to(ROOT)} cell {i}", code
    for script in sorted([*(ROOT / "benchmarks").glob("*.py"), *PACKAGE.glob("*.py")]):
        yield str(script.relative_to(ROOT)), script.read_text()


def _prose():
    """(where, text) of the docs pages and the README, without the README's migration table
    and the migration guide's pcjax 0.1 section (which name the removed API on purpose)."""
    readme = re.sub(
        r"### Migrating from pcjax 0\.2\n.*?(?=\n### )",
        "",
        (ROOT / "README.md").read_text(),
        flags=re.S,
    )
    yield "README.md", readme
    for page in sorted((ROOT / "docs").rglob("*.md")):
        yield str(page.relative_to(ROOT)), _page_text(page)


def test_no_page_notebook_script_or_docstring_uses_the_removed_api():
    offenders = [
        f"{where}: {m.group(0)}" for where, text in _prose() for m in REMOVED_NAME.finditer(text)
    ]
    for where, code in _code_of_pages_notebooks_and_scripts():
        offenders += [f"{where}: {m.group(0)}" for m in REMOVED_NAME.finditer(code)]
        offenders += [f"{where}: {call}" for call in _removed_api_calls(code)]
    assert not offenders, offenders


# ---------------------------------------------------------------- module structure


def _relative_imports(tree: ast.Module) -> tuple[set[str], list[str]]:
    """The pcjax modules `tree` imports at module level, and the imports nested in functions
    or classes (the lazy imports that dodge a cycle)."""
    top = {
        node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }
    nested = [
        f"line {node.lineno}: from .{node.module} import ..."
        for outer in tree.body
        if not isinstance(outer, ast.ImportFrom)
        for node in ast.walk(outer)
        if isinstance(node, ast.ImportFrom) and node.level == 1
    ]
    return top, nested


def test_no_lazy_imports_and_no_import_cycles():
    graph, lazy = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        top, nested = _relative_imports(ast.parse(path.read_text()))
        graph[path.stem] = top
        lazy += [f"{path.name} {line}" for line in nested]
    assert not lazy, lazy

    def cycle_from(module, path):
        if module in path:
            return [*path[path.index(module) :], module]
        for imported in sorted(graph.get(module, ())):
            found = cycle_from(imported, [*path, module])
            if found:
                return found
        return None

    for module in graph:
        assert cycle_from(module, []) is None, cycle_from(module, [])


def test_one_concrete_value_helper():
    defined = [
        f"{path.name}: {node.name}"
        for path in sorted(PACKAGE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and "concrete" in node.name
    ]
    assert defined == ["_checks.py: concrete_value"], defined


def test_concrete_value_is_none_while_traced_and_for_schedules():
    np.testing.assert_array_equal(concrete_value(jnp.array([1.0, 2.0])), [1.0, 2.0])
    assert concrete_value(0.5) == 0.5 and concrete_value(3).dtype.kind == "i"
    assert concrete_value(optax.linear_schedule(1.0, 0.0, 10)) is None
    seen = []
    jax.jit(lambda v: seen.append(concrete_value(v)) or v)(1.0)
    jax.jit(lambda v: seen.append(concrete_value([v, v])) or v)(1.0)
    assert seen == [None, None]


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ((0.0,), ValueError, "`step_size` must be positive"),
        ((-1.0,), ValueError, "`step_size` must be positive"),
        ((float("nan"),), ValueError, "`step_size` must be positive"),
        (("a",), TypeError, "`step_size` must be a number"),
        ((None,), TypeError, "`step_size` must be a number"),
        ((jnp.ones(2),), TypeError, "`step_size` must be a number"),
        ((jnp.ones(1),), TypeError, "`step_size` must be a number"),
        ((lambda t: 0.1,), TypeError, "`step_size` must be a number"),
    ],
)
def test_langevin_checks_its_step_size_when_concrete(arguments, error, message):
    with pytest.raises(error, match=message):
        pc.langevin(*arguments)


def test_langevin_checks_its_temperature_and_takes_traced_values():
    with pytest.raises(ValueError, match="`temperature` must be >= 0"):
        pc.langevin(0.1, temperature=-1.0)
    pc.langevin(jnp.asarray(0.1), temperature=0)  # a scalar array and an int are numbers
    grads = {"z": jnp.zeros((2, 3))}

    @jax.jit
    def update(step_size, temperature):  # traced: checked by nobody, used as given
        transform = pc.langevin(step_size, temperature=temperature)
        return transform.update(grads, transform.init(grads), key=jax.random.PRNGKey(0))[0]

    noise = update(0.5, 0.0)["z"]  # temperature 0: plain gradient descent, no noise
    np.testing.assert_array_equal(noise, np.zeros((2, 3)))
    assert float(jnp.std(update(0.5, 1.0)["z"])) > 0.1  # sqrt(2 * 0.5) = 1 per entry

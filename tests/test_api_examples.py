"""The API reference's examples run, and every public name documents itself fully.

- Every docstring of a public name (`pcjax.__all__`, `pcjax.nn.__all__`, the public names of
  `pcjax.datasets`) and of their public methods is run with the standard library's `doctest`
  (`NORMALIZE_WHITESPACE | ELLIPSIS`). The examples start from the imports and the tiny network
  of the API reference's index page ("The examples' setup" in `docs/api/index.md`): the test
  runs that page's code block, so the page and the examples cannot drift apart. The examples
  sit in fenced ```` ```pycon ```` blocks so that they render as code; the fence lines are
  blanked before `doctest` parses them (a fence would otherwise read as expected output).
- Every public name has an arguments list, what it returns and an example (the sections of the
  equinox/diffrax markdown style: `**Arguments:**`, `**Returns:**`, `**Example:**`), except
  the few of `EXEMPT`, each with its reason.

Cost, measured on one core (`taskset -c 0`): 31 s of CPU time for this file (29 s for the
examples, which compile: eager dispatch compiles every new primitive and shape once; 52 s with
XLA's optimisations on). Keep new examples on the setup's network and shapes, which are compiled
already.
"""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import pytest
from conftest import cheap_compiles

import pcjax
import pcjax.datasets
import pcjax.nn

ROOT = Path(__file__).resolve().parents[1]
SETUP_PAGE = ROOT / "docs" / "api" / "index.md"
FENCE = re.compile(r"^[ \t]*```.*$", re.MULTILINE)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

# The methods that the how-to guides call, documented like functions.
METHODS = ("FullPrecision.matrix", "DiagonalPrecision.values", "ScalarPrecision.value")

# Sections a name need not have, and why.
EXEMPT = {
    "pcjax.nn": (
        {"arguments", "returns", "raises"},
        "a module: its entries document their arguments and errors",
    ),
    "pcjax.datasets.DatasetUnavailableError": (
        {"arguments", "returns"},
        "an exception pcjax raises, not one users construct",
    ),
    "pcjax.datasets.UnsafePickleError": (
        {"arguments", "returns"},
        "an exception pcjax raises, not one users construct",
    ),
}


def public_objects() -> dict[str, object]:
    """Every public name, dotted, with its object."""
    objects = {f"pcjax.{name}": getattr(pcjax, name) for name in pcjax.__all__}
    objects |= {f"pcjax.nn.{name}": getattr(pcjax.nn, name) for name in pcjax.nn.__all__}
    for name, obj in vars(pcjax.datasets).items():
        if name.startswith("_") or name.isupper():  # private, or a constant
            continue
        if getattr(obj, "__module__", None) == "pcjax.datasets":
            objects[f"pcjax.datasets.{name}"] = obj
    return objects


OBJECTS = public_objects()


class FencedParser(doctest.DocTestParser):
    """doctest's parser, reading the examples of markdown code fences."""

    def parse(self, string: str, name: str = "<string>") -> list:
        return super().parse(FENCE.sub("", string), name)


@pytest.fixture(scope="module")
def fast_compiles():
    """Compile without XLA's optimisations while the examples run: they are tiny, so what
    they cost is compiling (eager dispatch compiles each new primitive and shape), and this
    cuts it by about a third (measured: 52 -> 34 s of CPU time for the whole file)."""
    with cheap_compiles():
        yield


@pytest.fixture(scope="module")
def setup_globals(fast_compiles) -> dict:
    """The namespace after the code block of "The examples' setup" on the API index page."""
    page = SETUP_PAGE.read_text()
    section = page.split("{ #examples-setup }", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {"__name__": "pcjax_api_examples"}
    exec(compile(code, str(SETUP_PAGE), "exec"), namespace)
    return namespace


def doctests(name: str) -> list[doctest.DocTest]:
    """The doctests of a public name's docstring and of its class's own methods (a module's
    own docstring only: its public names are tested one by one)."""
    obj = OBJECTS[name]
    recurse = not inspect.ismodule(obj)
    finder = doctest.DocTestFinder(parser=FencedParser(), recurse=recurse, exclude_empty=True)
    module = inspect.getmodule(obj)
    return finder.find(obj, name, module=module, globs={})


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_docstring_examples_run(name: str, setup_globals: dict):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in doctests(name):
        test.globs = dict(setup_globals)
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def sections(doc: str) -> set[str]:
    """The markdown sections a docstring has (`**Arguments:**`, `**Returns:**`, ...)."""
    found = set()
    for key, pattern in {
        "arguments": r"\*\*(Arguments|Main arguments|Fields)\b",
        "returns": r"\*\*Returns\b",
        "raises": r"\*\*Raises\b",
        "example": r"\*\*Examples?\b",
    }.items():
        if re.search(pattern, doc):
            found.add(key)
    if ">>>" not in doc:
        found.discard("example")
    return found


def required(name: str, obj: object) -> set[str]:
    """The sections a public name must have: an argument list (unless it takes none), what it
    returns (a class: what its instances are is its description), what it raises (not for the
    result records pcjax returns, NamedTuples whose construction checks nothing, nor for
    exceptions), and an example."""
    need = {"arguments", "returns", "raises", "example"}
    if inspect.isclass(obj):
        need.discard("returns")
        if issubclass(obj, (tuple, BaseException)):
            need.discard("raises")
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a module, or a class without a Python signature
        parameters = {}
    if not parameters:
        need.discard("arguments")
    exempt, _reason = EXEMPT.get(name, (set(), ""))
    return need - exempt


def test_every_public_name_documents_arguments_returns_raises_and_an_example():
    missing = {}
    for name, obj in sorted(OBJECTS.items()):
        lacking = required(name, obj) - sections(inspect.getdoc(obj) or "")
        if lacking:
            missing[name] = sorted(lacking)
    for method in METHODS:
        cls, attr = method.split(".")
        doc = inspect.getdoc(getattr(getattr(pcjax, cls), attr)) or ""
        lacking = {"returns", "example"} - sections(doc)
        if lacking:
            missing[f"pcjax.{method}"] = sorted(lacking)
    assert not missing, f"{len(missing)} public names lack sections: {missing}"

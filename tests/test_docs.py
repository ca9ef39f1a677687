"""The documentation site builds strictly and is complete.

One `mkdocs build --strict` (warnings are errors: a broken link or cross-reference, a missing
page or a docstring mkdocstrings cannot render fails it) into a temporary folder, then checks on
its output: every public name has an API entry, the notebooks are rendered with their stored
plots, the benchmark page shows the numbers of the JSON result files. The guides' code
blocks run in tests/test_docs_examples.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pcjax
import pcjax.nn

for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
    pytest.importorskip(module, reason="the docs extra: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
BENCHMARKS = ROOT / "benchmarks"
ANCHOR = re.compile(r'id="(pcjax\.[A-Za-z0-9_.]+)"')
DIRECTIVE = re.compile(r"^::: (pcjax\.[A-Za-z0-9_.]+)\s*$", re.MULTILINE)


def public_names() -> set[str]:
    """Every public name: `pcjax.__all__` and `pcjax.nn.__all__`, as dotted paths."""
    names = {f"pcjax.{name}" for name in pcjax.__all__}
    return names | {f"pcjax.nn.{name}" for name in pcjax.nn.__all__}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # No --quiet: it silences the warnings, and strict mode then counts none (an unresolved
    # cross-reference such as [pcjax.nonexistent][] in a docstring built "successfully").
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    return out


def page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text()


def test_every_public_name_has_a_docstring():
    missing = [name for name in sorted(public_names()) if not inspect.getdoc(_resolve(name))]
    assert not missing, f"public names without a docstring: {missing}"


def _resolve(dotted: str):
    obj = pcjax
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_api_pages_list_every_public_name():
    """The `::: name` directives of docs/api/ cover pcjax.__all__ and pcjax.nn.__all__."""
    listed = {m for p in (DOCS / "api").glob("*.md") for m in DIRECTIVE.findall(p.read_text())}
    assert public_names() - listed == set(), "names missing from docs/api/*.md"


def test_api_reference_has_an_entry_for_every_public_name(site):
    documented = set()
    for html in (site / "api").rglob("*.html"):
        documented |= set(ANCHOR.findall(html.read_text()))
    assert public_names() - documented == set(), "names missing from the built API reference"


def test_api_pages_carry_maths_and_source(site):
    html = page(site, "api/natural-gradient")
    assert html.count('class="arithmatex"') >= 10  # typeset by MathJax in the browser
    assert "\\otimes" in html and "assets/mathjax/MathJax.js" in html
    assert "Source code in" in html  # mkdocstrings' show_source


def test_notebooks_are_rendered_with_their_stored_plots(site):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        data = json.loads(notebook.read_text())
        pngs = [
            output["data"]["image/png"]
            for cell in data["cells"]
            for output in cell.get("outputs", [])
            if "image/png" in output.get("data", {})
        ]
        html = page(site, f"notebooks/{notebook.stem}")
        for png in pngs:
            png = "".join(png) if isinstance(png, list) else png
            assert png.strip()[:200] in html, f"{notebook.name}: a stored plot is not on its page"
        assert html.count("data:image/png;base64,") >= len(pngs)
    assert "data:image/png;base64," in page(site, "notebooks/quickstart")


def _report():
    """benchmarks/report.py, loaded the way the site's hook loads it."""
    spec = importlib.util.spec_from_file_location("pcjax_docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks.report_module()


NUMBER = re.compile(r"^-?[0-9][0-9.,]*(?: ?(?:ms|s|min|MiB|x|%))?$")


def test_benchmark_page_shows_the_json_results(site):
    report = _report()
    html = page(site, "benchmarks")
    readme = (BENCHMARKS / "README.md").read_text()
    files = set(report.sources(readme)) | {
        f"results/{p.name}" for p in (BENCHMARKS / "results").glob("*.json")
    }
    checked = 0
    for name in sorted(files):
        document = json.loads((BENCHMARKS / name).read_text())
        if document.get("experiment") not in report.RENDERERS:
            continue
        views = re.findall(rf"<!-- report: {re.escape(name)} (\S+) -->", readme) or [None]
        for view in views:
            rows = [r for r in report.render(document, view).splitlines() if r.startswith("| ")]
            cells = [c.strip() for row in rows[2:] for c in row.strip("|").split("|")]
            numbers = [c for c in cells if NUMBER.match(c)]
            assert numbers, f"{name}: no numbers in its table"
            missing = [c for c in numbers if f">{c}<" not in html]
            assert not missing, f"{name}: numbers missing from the benchmark page: {missing[:5]}"
            checked += 1
    assert checked >= 10


def test_readme_links_to_the_site_pages():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 5
    for link in links:
        assert (ROOT / link).is_file(), f"README links to a missing page: {link}"
    assert "mkdocs serve" in readme


# ---------------------------------------------------------------------------------------------
# Offline: every page typesets its maths from the site itself and fetches nothing from outside.

EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //
RESOURCE = re.compile(  # what a browser fetches by itself: scripts, stylesheets, fonts, images
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*?\bsrc=[\"']([^\"']*)[\"']"
    r"|<link\b[^>]*?\bhref=[\"']([^\"']*)[\"']",
    re.IGNORECASE,
)
CSS_URL = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"'])([^\"')]+)", re.IGNORECASE)
LOADER = re.compile(r'<script src="([^"?]*MathJax\.js)\?config=[^"]+"></script>')


def test_no_page_requests_anything_from_outside_the_site(site):
    """No script, stylesheet, font, icon or image of any page (or of the site's CSS) comes from
    another host: the site works offline, e.g. on a firewalled cluster."""
    external = []
    for html in sorted(site.rglob("*.html")):
        for match in RESOURCE.finditer(html.read_text()):
            url = match.group(1) or match.group(2)
            if EXTERNAL.match(url) or url == "":  # an empty src fetches the page itself
                external.append(f"{html.relative_to(site)}: {url!r}")
    for css in sorted(site.rglob("*.css")):
        for url in CSS_URL.findall(css.read_text(errors="replace")):
            if EXTERNAL.match(url.strip()):
                external.append(f"{css.relative_to(site)}: {url!r}")
    assert not external, "pages fetch from outside the site:\n" + "\n".join(external[:20])


def test_every_page_loads_mathjax_from_the_site(site):
    """Every page (notebooks included) loads the site's own MathJax once, by a relative URL
    that resolves to the copied file; mkdocs-jupyter's loader is gone from the notebooks."""
    pages = sorted(site.rglob("index.html"))
    assert len(pages) >= 30
    for html in pages:
        text = html.read_text()
        loaders = LOADER.findall(text)
        assert len(loaders) == 1, f"{html.relative_to(site)}: {len(loaders)} MathJax loaders"
        assert (html.parent / loaders[0]).resolve().is_file(), f"{html}: {loaders[0]} missing"
        assert "Load mathjax" not in text  # mkdocs-jupyter's own block (CDN or empty src)
    for font in ("STIXMathJax_Main-Regular.woff", "STIXMathJax_Normal-Italic.woff"):
        assert list((site / "assets" / "mathjax").rglob(font)), f"MathJax font {font} missing"


def test_maths_is_left_for_mathjax_with_the_delimiters_it_is_configured_for(site):
    """Site pages hold arithmatex's \\( \\) / \\[ \\] and are configured for them; notebook pages
    hold Jupyter's $ $ maths and are configured for $ too."""
    concepts = page(site, "concepts")
    assert concepts.count('class="arithmatex"') >= 10
    assert '"inlineMath": [["\\\\(", "\\\\)"]]' in concepts  # no $: prose may hold dollars
    notebook = page(site, "notebooks/natural_gradients")
    assert '"inlineMath": [["$", "$"], ["\\\\(", "\\\\)"]]' in notebook
    assert re.search(r"\$[^$<>]*\\[a-zA-Z]+[^$<>]*\$", notebook), "no $ maths on the notebook page"

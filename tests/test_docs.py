"""The documentation site builds strictly and is complete.

One `mkdocs build --strict` (warnings are errors: a broken link or cross-reference, a missing
page or a docstring mkdocstrings cannot render fails it) into a temporary folder, then checks on
its output: every public name has an API entry, the notebooks are rendered with their stored
plots and a download link, the benchmark page shows the numbers of the JSON result files, every
internal link and anchor resolves, and nothing outside the site is fetched or referred to. The
guides' code blocks run, and print what the pages quote, in tests/test_docs_examples.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from html import unescape
from pathlib import Path
from urllib.parse import unquote, urlsplit

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


# ---------------------------------------------------------------------------------------------
# No dead ends: links, anchors, references, notebook downloads, the benchmark page.

HREF = re.compile(r"<a\b[^>]*?\bhref=[\"']([^\"']*)[\"']", re.IGNORECASE)
IDS = re.compile(r"\b(?:id|name)=[\"']([^\"']+)[\"']")
SOURCE_CODE = re.compile(r'<details class="mkdocstrings-source".*?</details>', re.DOTALL)
TAGS = re.compile(r"<[^>]+>")


def broken_links(site: Path) -> list[str]:
    """Every link of every page of `site` to a file of the site that does not exist, or to an
    anchor that its page does not have ("page: href (why)")."""
    anchors: dict[Path, set[str]] = {}
    broken = []
    for html in sorted(site.rglob("*.html")):
        for href in HREF.findall(html.read_text()):
            href = unescape(href)
            parts = urlsplit(href)
            if parts.scheme or parts.netloc:  # another site (not fetched by a browser itself)
                continue
            target = html
            if parts.path:  # relative to the page, or to the site's root (404.html's links)
                base = site if parts.path.startswith("/") else html.parent
                target = (base / unquote(parts.path).lstrip("/")).resolve()
                if target.is_dir():
                    target = target / "index.html"
            where = f"{html.relative_to(site)}: {href}"
            if not target.is_file():
                broken.append(f"{where} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                if target not in anchors:
                    anchors[target] = {unescape(i) for i in IDS.findall(target.read_text())}
                if unquote(parts.fragment) not in anchors[target]:
                    broken.append(f"{where} (no such anchor)")
    return broken


def test_every_link_of_the_site_resolves(site):
    """Internal links and anchors of every page (notebooks' tables of contents and links to
    other notebooks included) lead to a file and an id that the built site has."""
    assert len(list(site.rglob("*.html"))) >= 30
    broken = broken_links(site)
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:30])


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="x">X</h2><a href="#x">ok</a>')
    page = '<a href="a/#x">ok</a><a href="a/#y">no anchor</a><a href="b.ipynb">no file</a>'
    (tmp_path / "index.html").write_text(page + '<a href="https://example.org/">away</a>')
    assert broken_links(tmp_path) == [
        "index.html: a/#y (no such anchor)",
        "index.html: b.ipynb (no such file)",
    ]


def prose(html: str) -> str:
    """A page's text without its shown source code (mkdocstrings' "Source code in" blocks)."""
    return TAGS.sub(" ", SOURCE_CODE.sub(" ", html))


def test_pages_name_nothing_that_is_not_on_the_site(site):
    """No page points its reader to a private module, the design notes or the README (none of
    them is on the site); the guides, notebooks, changelog and benchmark page name no
    private `pcjax._module` at all."""
    unreachable = re.compile(r"DESIGN|README|TransformerLayer|pcjax\._nudging")
    private = re.compile(r"pcjax\._[a-z]")
    found = []
    for html in sorted(site.rglob("index.html")):
        name = str(html.parent.relative_to(site))
        text = prose(html.read_text())
        found += [f"{name}: {m.group()}" for m in unreachable.finditer(text)]
        if not name.startswith("api"):
            found += [f"{name}: {m.group()}" for m in private.finditer(text)]
    assert not found, "references to what is not on the site:\n" + "\n".join(found)


def test_the_migration_guide_and_the_changelog_are_pages(site):
    guide = page(site, "coming-from")
    assert 'id="from-pcjax-01"' in guide and "pc.make_train_step" in guide
    assert "pc.train_step" in guide and "steps=T" in guide  # the 0.1 calls, next to the new
    changelog = page(site, "changelog")
    assert 'id="030"' in changelog and 'id="010"' in changelog
    home = page(site, "")
    assert 'href="coming-from/"' in home and 'href="changelog/"' in home


def test_notebook_pages_offer_their_notebook_and_show_the_full_run(site):
    """Each notebook page links to the notebook file, which the site holds byte for byte, and
    shows the code of the full run that made its outputs: no short-form switch."""
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        html = page(site, f"notebooks/{notebook.stem}")
        assert f'href="../{notebook.name}" download' in html, f"{notebook.name}: no download"
        assert (site / "notebooks" / notebook.name).read_bytes() == notebook.read_bytes()
        text = prose(html)
        assert "PCJAX_NOTEBOOK_SMALL" not in text and not re.search(r"\bSMALL\b", text), (
            f"{notebook.name}: its page shows the tests' short-form switch"
        )


def test_the_short_form_switch_resolves_to_the_full_run():
    """docs/hooks.py's display copy of a code cell: `SMALL` taken as False, its comments gone."""
    spec = importlib.util.spec_from_file_location("pcjax_docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    cell = (
        "import os\n"
        'SMALL = os.environ.get("PCJAX_NOTEBOOK_SMALL") == "1"  # CI: shorter\n'
        "steps = 10 if SMALL else 3000  # steps of 0.1\n"
        "sizes = (5, 2) if SMALL else (600, 200)\n"
        "if SMALL:  # the short form: one seed\n"
        "    seeds = [0]\n"
        "if not SMALL:\n"
        "    tune = [fit(lr) for lr in (1e-3 if SMALL else 1e-4, 1e-2)]\n"
        "print(steps)\n"
    )
    assert hooks.full_run_source(cell, "cell") == (
        "import os\n"
        "steps = 3000  # steps of 0.1\n"
        "sizes = (600, 200)\n"
        "tune = [fit(lr) for lr in (1e-4, 1e-2)]\n"
        "print(steps)"
    )
    with pytest.raises(ValueError, match="cell 3"):
        hooks.full_run_source("run(small=SMALL)\n", "cell 3")


def test_the_benchmark_page_reads_as_a_page_and_its_tables_scroll(site):
    html = page(site, "benchmarks")
    text = prose(html)
    assert "README" not in text and "report markers" not in text
    tables = html.count("<table>")
    assert tables >= 10 and html.count('<div class="pcjax-wide-table">') == tables
    css = (site / "stylesheets" / "extra.css").read_text()
    assert re.search(r"\.pcjax-wide-table\s*\{[^}]*overflow-x:\s*auto", css)
    assert 'href="../stylesheets/extra.css"' in html

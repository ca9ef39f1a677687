"""MkDocs hooks of pcjax's documentation site (`hooks:` in mkdocs.yml).

- The benchmark results page, `benchmarks.md`, is generated at build time: the text of
  `benchmarks/README.md` with every result table rendered afresh from its JSON file in
  `benchmarks/results/` by `benchmarks/report.py` (the same renderer that writes the README's
  tables), followed by the tables of any result file the README does not cite and the figures
  in `benchmarks/results/`. The README's introduction (the files of `benchmarks/` and how to
  regenerate the README) gives way to the page's own, and every table sits in a block that
  scrolls sideways when it is wider than the text (`docs/stylesheets/extra.css`).
- The notebooks of `notebooks/` become pages under `notebooks/`, rendered by mkdocs-jupyter with
  their stored outputs (never executed by the build). The outputs are those of the full runs;
  the test suite runs each notebook in a short form, switched by `PCJAX_NOTEBOOK_SMALL=1`. A
  page shows the code of the full run: `full_run_source` resolves the `SMALL` switch in a
  display copy of each code cell (`A if SMALL else B` -> `B`, `if SMALL:` blocks dropped, `if
  not SMALL:` blocks kept), the notebook file itself is unchanged. Each page links to the
  notebook file, copied next to it (`notebooks/NAME.ipynb`), links between notebooks
  (`other.ipynb`) point to the other notebook's page, and the page's table of contents uses
  the heading ids that the page has (mkdocs-jupyter's drops inline code from them).
- Maths is typeset in the browser by MathJax 2, served by the site itself: the build copies
  the MathJax that Jupyter's server extension ships (the `jupyter-server-mathjax` package of
  the docs extra) into `assets/mathjax/`, and every page loads it by a relative URL. No page
  requests anything from outside the site (the theme's web fonts are off in mkdocs.yml), so
  the site works offline, e.g. on a firewalled cluster. Site pages typeset what
  pymdownx.arithmatex leaves (`\\( \\)`, `\\[ \\]`); notebook pages also `$ $` and `$$ $$`, as
  Jupyter does. mkdocs-jupyter's own MathJax loader (a CDN URL, or an empty one) is removed.
"""

from __future__ import annotations

import ast
import atexit
import html
import importlib.util
import io
import json
import re
import shutil
import tempfile
import tokenize
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NOTEBOOKS = ROOT / "notebooks"
MATHJAX_DIR = "assets/mathjax"  # where the build puts MathJax, relative to the site root
# The combined configuration that jupyter-server-mathjax ships: TeX input, HTML-CSS output.
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full"
# mkdocs-jupyter's MathJax block (from nbconvert's `base/mathjax.html.j2` macro).
NOTEBOOK_MATHJAX = re.compile(
    r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S
)
SWITCH = "SMALL"  # the notebooks' short-form switch, read from PCJAX_NOTEBOOK_SMALL
# A comment that is about the short form only (dropped from the page's code with the switch).
SHORT_FORM_COMMENT = re.compile(r"PCJAX_NOTEBOOK_SMALL|\bCI\b|short form|shorter version")
NOTEBOOK_LINK = re.compile(r'href="([A-Za-z0-9_-]+)\.ipynb(#[^"]*)?"')
HEADING_ID = re.compile(r'<h[1-6][^>]*\bid="([^"]+)"')


def report_module():
    """benchmarks/report.py, loaded as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "pcjax_benchmarks_report", BENCHMARKS / "report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Maintainers' wording of benchmarks/README.md -> the page's (a regular expression each).
README_WORDING = [
    (
        r"it goes here between report\s+markers citing `results/suite-speed.json`, filled by "
        r"`report.py`\.",
        "it will appear here.",
    ),
]


def page_preamble(readme_preamble: str) -> str:
    """The benchmark page's introduction, in place of the README's (which describes the files
    of `benchmarks/` and how to regenerate the README): what the page is, where the how-to is,
    and the README's paragraphs about the machines the numbers come from."""
    kept = [
        paragraph
        for paragraph in readme_preamble.split("\n\n")
        if paragraph.lstrip().startswith("Most runs of")
    ]
    intro = (
        "Every table on this page is rendered at build time from a JSON result file in "
        "`benchmarks/results/` of the repository (by `benchmarks/report.py`), so the page shows "
        "what the runs measured; the line above each table names the device, the host's load "
        "average when the run started and the date. How to run the experiments and time your "
        "own network: [Benchmark](how-to/benchmark.md)."
    )
    return "\n\n".join([intro, *kept]) + "\n\n"


def benchmarks_page() -> str:
    """The benchmark results page: benchmarks/README.md with its tables rendered from JSON,
    its introduction rewritten as a page's, then the result files it does not cite."""
    report = report_module()
    text = report.regenerate((BENCHMARKS / "README.md").read_text(), BENCHMARKS)
    cited = {(BENCHMARKS / path).resolve() for path in report.sources(text)}
    _, _, body = text.partition("\n")
    preamble, heading, sections = body.partition("\n## ")
    body = page_preamble(preamble) + heading.lstrip("\n") + sections
    for pattern, replacement in README_WORDING:
        body = re.sub(pattern, replacement, body)
    extra = []
    for path in sorted((BENCHMARKS / "results").glob("*.json")):
        if path.resolve() in cited:
            continue
        document = json.loads(path.read_text())
        if document.get("experiment") in report.RENDERERS:
            extra.append(f"### `results/{path.name}`\n\n{report.render(document)}\n")
    if extra:
        body += "\n## Other result files\n\n" + "\n".join(extra)
    figures = sorted((BENCHMARKS / "results").glob("*.png"))
    if figures:
        body += "\n## Figures\n\n" + "\n".join(
            f"![results/{p.name}](benchmarks/{p.name})\n\n`results/{p.name}`\n" for p in figures
        )
    return f"# Benchmark results\n\n{wrap_tables(body)}"


def wrap_tables(markdown: str) -> str:
    """Every Markdown table of `markdown` inside a `pcjax-wide-table` block, which scrolls
    sideways when the table is wider than the text (docs/stylesheets/extra.css)."""
    lines, out, in_code, table = markdown.split("\n"), [], False, []
    for line in [*lines, ""]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            table.append(line)
            continue
        if table:
            out += ['<div class="pcjax-wide-table" markdown>', "", *table, "", "</div>"]
            table = []
        out.append(line)
    return "\n".join(out[:-1])


def mathjax_source() -> Path:
    """The folder holding `MathJax.js` in the installed jupyter-server-mathjax package."""
    try:
        import jupyter_server_mathjax
    except ImportError as error:
        raise ImportError(
            "the docs need MathJax from the jupyter-server-mathjax package: "
            "pip install -e '.[docs]'"
        ) from error
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def mathjax_head(page_url: str, notebook: bool) -> str:
    """The MathJax configuration and loader for one page, by a URL relative to the page."""
    inline = [["\\(", "\\)"]]
    display = [["\\[", "\\]"]]
    if notebook:  # Jupyter's delimiters too, as in the notebook
        inline.insert(0, ["$", "$"])
        display.insert(0, ["$$", "$$"])
    config = {
        "tex2jax": {
            "inlineMath": inline,
            "displayMath": display,
            "processEscapes": True,
            "processEnvironments": True,
        },
        "TeX": {"equationNumbers": {"autoNumber": "AMS"}},
        # The package ships MathJax's STIX-Web fonts (not its TeX ones): use them, never a
        # locally installed font or image fonts, so every machine renders the same.
        "HTML-CSS": {
            "availableFonts": [],
            "preferredFont": None,
            "webFont": "STIX-Web",
            "imageFont": None,
            "linebreaks": {"automatic": True},
        },
        "messageStyle": "none",
        "showMathMenu": False,
    }
    src = get_relative_url(f"{MATHJAX_DIR}/MathJax.js", page_url)
    return (
        f'<script type="text/x-mathjax-config">MathJax.Hub.Config({json.dumps(config)});</script>\n'
        f'<script src="{src}?config={MATHJAX_CONFIG}"></script>\n'
    )


def _is_switch(test: ast.expr) -> bool | None:
    """True for `SMALL`, False for `not SMALL`, None for any other test."""
    if isinstance(test, ast.Name) and test.id == SWITCH:
        return True
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return False if _is_switch(test.operand) else None
    return None


def _first_switch_edit(source: bytes, tree: ast.AST) -> tuple[int, int, bytes] | None:
    """The first (outermost) use of the switch in `source`: (start, end, replacement), in bytes
    (ast's columns are UTF-8 byte offsets)."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def span(node: ast.AST, whole_lines: bool = False) -> tuple[int, int]:
        if whole_lines:
            return starts[node.lineno - 1], starts[node.end_lineno]
        return (
            starts[node.lineno - 1] + node.col_offset,
            starts[node.end_lineno - 1] + node.end_col_offset,
        )

    for node in ast.walk(tree):  # breadth first: outer statements before inner ones
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == SWITCH for target in node.targets
        ):
            return (*span(node, whole_lines=True), b"")
        if isinstance(node, ast.IfExp) and _is_switch(node.test) is not None:
            kept = node.orelse if _is_switch(node.test) else node.body
            start, end = span(kept)
            return (*span(node), source[start:end])
        if isinstance(node, ast.If) and _is_switch(node.test) is not None:
            kept = node.orelse if _is_switch(node.test) else node.body
            replacement = b""
            if kept:
                lines = source[span(kept[0], True)[0] : span(kept[-1], True)[1]]
                indent = kept[0].col_offset - node.col_offset
                replacement = b"".join(
                    line[indent:] if line.strip() else line
                    for line in lines.splitlines(keepends=True)
                )
            return (*span(node, whole_lines=True), replacement)
    return None


def _drop_short_form_comments(code: str) -> str:
    """`code` without the comments about the short form (whole-line or trailing)."""
    lines = code.splitlines(keepends=True)
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    for token in reversed([t for t in tokens if t.type == tokenize.COMMENT]):
        if not SHORT_FORM_COMMENT.search(token.string):
            continue
        row, col = token.start
        line = lines[row - 1]
        kept = line[:col].rstrip()
        lines[row - 1] = kept + "\n" if kept else ""
    return re.sub(r"\n{4,}", "\n\n\n", "".join(lines))


def full_run_source(code: str, where: str) -> str:
    """A notebook code cell as the full run executes it: the short-form switch `SMALL` resolved
    to False and the comments about the short form dropped.

    Raises:
        ValueError: when `SMALL` is used in a way this cannot resolve (naming `where`).
    """
    if not re.search(rf"\b{SWITCH}\b|PCJAX_NOTEBOOK_SMALL", code):
        return code
    source = code.encode()
    while (edit := _first_switch_edit(source, ast.parse(source))) is not None:
        start, end, replacement = edit
        source = source[:start] + replacement + source[end:]
    shown = _drop_short_form_comments(source.decode()).strip("\n")
    names = {n.id for n in ast.walk(ast.parse(shown)) if isinstance(n, ast.Name)}
    if SWITCH in names or "PCJAX_NOTEBOOK_SMALL" in shown:
        raise ValueError(f"{where}: cannot show the full run of this cell:\n{code}")
    return shown


def display_notebook(path: Path, folder: Path) -> Path:
    """A copy of the notebook at `path`, in `folder`, whose code cells show the full run."""
    notebook = json.loads(path.read_text())
    cells = []
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            code = "".join(cell["source"])
            shown = full_run_source(code, f"{path.name}, cell {number}")
            if not shown.strip() and not cell.get("outputs"):
                continue  # a cell that only set up the short form
            cell = {**cell, "source": shown}
        cells.append(cell)
    target = folder / "notebooks" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**notebook, "cells": cells}))
    return target


def notebook_banner(page_url: str, name: str) -> str:
    """The download link at the top of a notebook's page."""
    href = get_relative_url(f"notebooks/{name}", page_url)
    return (
        '<div class="admonition info"><p class="admonition-title">Run it yourself</p><p>'
        f'Download the notebook: <a href="{href}" download><code>{html.escape(name)}</code></a>'
        " (in a clone of pcjax: <code>pip install -e '.[notebooks]'</code>, then Jupyter). "
        "This page shows it with the "
        "outputs of its full run; the test suite runs a shorter form of it.</p></div>\n"
    )


def link_notebooks(content: str, page_url: str) -> str:
    """Links to another notebook file (`other.ipynb`) point to that notebook's page."""

    def page_link(match: re.Match) -> str:
        stem, anchor = match.group(1), match.group(2) or ""
        if not (NOTEBOOKS / f"{stem}.ipynb").is_file():
            return match.group(0)
        return f'href="{get_relative_url(f"notebooks/{stem}/", page_url)}{anchor}"'

    return NOTEBOOK_LINK.sub(page_link, content)


def fix_toc_anchors(toc, ids: list[str]) -> None:
    """Point each table-of-contents entry at a heading id the page has: mkdocs-jupyter's
    entries drop inline code (`## A GRU, with `lax.scan``: `a-gru-with`), its headings keep it
    (`a-gru-with-laxscan`)."""
    for item in toc:
        if item.id not in ids:
            matches = [i for i in ids if i.startswith(item.id)]
            if len(matches) == 1:
                item.id = matches[0]
        fix_toc_anchors(item.children, ids)


def on_page_content(content, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return content
    name = Path(page.file.src_uri).name
    content = link_notebooks(content, page.url)
    title_end = content.find("</h1>")  # under the notebook's title, if it has one
    at = title_end + len("</h1>") if title_end >= 0 else 0
    return content[:at] + notebook_banner(page.url, name) + content[at:]


def on_page_context(context, page, config, nav):
    if page.file.src_uri.endswith(".ipynb"):
        fix_toc_anchors(page.toc, HEADING_ID.findall(page.content or ""))
    return context


def on_config(config):
    mathjax_source()  # fail early, with the install command, if MathJax is missing
    return config


def on_post_page(output, page, config):
    notebook = page.file.src_uri.endswith(".ipynb")
    output = NOTEBOOK_MATHJAX.sub("", output)
    return output.replace("</head>", mathjax_head(page.url, notebook) + "</head>", 1)


def on_post_build(config):
    target = Path(config.site_dir) / MATHJAX_DIR
    shutil.copytree(mathjax_source(), target, dirs_exist_ok=True)
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):  # the files the pages link to
        shutil.copyfile(notebook, Path(config.site_dir) / "notebooks" / notebook.name)


@event_priority(100)  # before mkdocs-jupyter's, which turns the notebooks into pages
def on_files(files, config):
    folder = Path(tempfile.mkdtemp(prefix="pcjax-docs-notebooks-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        # An ordinary file, as mkdocs-jupyter needs: the display copy of the notebook.
        display_notebook(notebook, folder)
        uri = f"notebooks/{notebook.name}"
        files.append(File(uri, str(folder), config.site_dir, config.use_directory_urls))
    files.append(File.generated(config, "benchmarks.md", content=benchmarks_page()))
    for png in sorted((BENCHMARKS / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    return files

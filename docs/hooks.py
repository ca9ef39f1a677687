"""MkDocs hooks of pcjax's documentation site (`hooks:` in mkdocs.yml).

- The benchmark results page, `benchmarks.md`, is generated at build time: the text of
  `benchmarks/README.md` with every result table rendered afresh from its JSON file in
  `benchmarks/results/` by `benchmarks/report.py` (the same renderer that writes the README's
  tables), followed by the tables of any result file the README does not cite and the figures
  in `benchmarks/results/`.
- The notebooks of `notebooks/` become pages under `notebooks/`, rendered by mkdocs-jupyter with
  their stored outputs (never executed by the build).
- Maths is typeset in the browser by MathJax 2, served by the site itself: the build copies
  the MathJax that Jupyter's server extension ships (the `jupyter-server-mathjax` package of
  the docs extra) into `assets/mathjax/`, and every page loads it by a relative URL. No page
  requests anything from outside the site (the theme's web fonts are off in mkdocs.yml), so
  the site works offline, e.g. on a firewalled cluster. Site pages typeset what
  pymdownx.arithmatex leaves (`\\( \\)`, `\\[ \\]`); notebook pages also `$ $` and `$$ $$`, as
  Jupyter does. mkdocs-jupyter's own MathJax loader (a CDN URL, or an empty one) is removed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
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


def report_module():
    """benchmarks/report.py, loaded as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "pcjax_benchmarks_report", BENCHMARKS / "report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmarks_page() -> str:
    """The benchmark results page: benchmarks/README.md with its tables rendered from JSON."""
    report = report_module()
    text = report.regenerate((BENCHMARKS / "README.md").read_text(), BENCHMARKS)
    cited = {(BENCHMARKS / path).resolve() for path in report.sources(text)}
    intro = (
        '!!! info "Generated from the result files"\n'
        "    This page is `benchmarks/README.md` with every table rendered at build time from "
        "the JSON file in `benchmarks/results/` that it cites (by `benchmarks/report.py`, which "
        "also writes the README's tables).\n\n"
    )
    title, _, body = text.partition("\n")
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
    return f"{title}\n\n{intro}{body}"


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


@event_priority(100)  # before mkdocs-jupyter's, which turns the notebooks into pages
def on_files(files, config):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        # An ordinary file whose source folder is the repository root, as mkdocs-jupyter needs.
        uri = f"notebooks/{notebook.name}"
        files.append(File(uri, str(ROOT), config.site_dir, config.use_directory_urls))
    files.append(File.generated(config, "benchmarks.md", content=benchmarks_page()))
    for png in sorted((BENCHMARKS / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    return files

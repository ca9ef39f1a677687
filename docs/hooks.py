"""MkDocs hooks of pcjax's documentation site (`hooks:` in mkdocs.yml).

- The benchmark results page, `benchmarks.md`, is generated at build time: the text of
  `benchmarks/README.md` with every result table rendered afresh from its JSON file in
  `benchmarks/results/` by `benchmarks/report.py` (the same renderer that writes the README's
  tables), followed by the tables of any result file the README does not cite and the figures
  in `benchmarks/results/`.
- The notebooks of `notebooks/` become pages under `notebooks/`, rendered by mkdocs-jupyter with
  their stored outputs (never executed by the build).
- Maths is typeset by KaTeX (site pages) and by MathJax 2 (the notebooks' markdown cells, as
  mkdocs-jupyter renders them), loaded from a CDN; `PCJAX_KATEX_URL` (a folder holding
  `katex.min.js`, `katex.min.css` and `contrib/auto-render.min.js`) and `PCJAX_MATHJAX_URL`
  (MathJax 2's `MathJax.js?config=...`) point them elsewhere, e.g. at local copies to browse
  the site offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NOTEBOOKS = ROOT / "notebooks"
KATEX = "https://cdn.jsdelivr.net/npm/katex@0.16.11/dist"


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


def on_config(config):
    katex = os.environ.get("PCJAX_KATEX_URL", KATEX).rstrip("/")
    config["extra_css"].append(f"{katex}/katex.min.css")
    for script in (f"{katex}/katex.min.js", f"{katex}/contrib/auto-render.min.js"):
        config["extra_javascript"].append(script)
    config["extra_javascript"].append("javascripts/katex.js")
    mathjax = os.environ.get("PCJAX_MATHJAX_URL")
    if mathjax:
        config["plugins"]["mkdocs-jupyter"].config["custom_mathjax_url"] = mathjax
    return config


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

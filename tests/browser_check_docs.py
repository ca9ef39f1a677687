"""Render every page of a built documentation site in headless Chromium, offline, and count the
maths left untypeset.

    mkdocs build --strict -d /tmp/site && python tests/browser_check_docs.py /tmp/site

The site is served on 127.0.0.1 and Chromium resolves no other host (as on a machine with no
internet), waits for MathJax, and dumps the page's DOM. A page fails if MathJax typeset nothing
where the page holds maths, or if raw delimiters (`\\(`, `\\[`, and `$` on notebook pages) are
left in its text. Needs Chromium (`apt-get install chromium`); not part of the test suite
(about a second a page), whose `tests/test_docs.py` checks the built HTML instead.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL | re.IGNORECASE)
STYLE = re.compile(r"<style\b.*?</style>", re.DOTALL | re.IGNORECASE)
CODE = re.compile(r"<(pre|code)\b.*?</\1>", re.DOTALL | re.IGNORECASE)
TAG = re.compile(r"<[^>]+>")
TYPESET = re.compile(r'class="MathJax(?:_Display)?"')
RAW = re.compile(r"\\\(|\\\[")
DOLLARS = re.compile(r"\$[^$\n]{1,200}\\[A-Za-z]+[^$\n]{0,200}\$")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("no Chromium found: apt-get install chromium")


def render(browser: str, url: str) -> str:
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main(site: Path) -> int:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser, failures, total = chromium(), 0, 0
    for html in sorted(site.rglob("index.html")):
        path = html.parent.relative_to(site).as_posix()
        source = html.read_text()
        dom = render(browser, f"http://127.0.0.1:{server.server_port}/{path}/")
        typeset = len(TYPESET.findall(dom))
        text = TAG.sub(" ", CODE.sub(" ", STYLE.sub(" ", SCRIPT.sub(" ", dom))))
        raw = len(RAW.findall(text))
        if path.startswith("notebooks/"):
            raw += len(DOLLARS.findall(text))
        expected = 'class="arithmatex"' in source or DOLLARS.search(TAG.sub(" ", source))
        bad = raw > 0 or (expected and typeset == 0) or not dom
        failures += bad
        total += typeset
        print(f"{'FAIL' if bad else 'ok  '} {path or '/':45s} typeset {typeset:4d}  raw {raw}")
    server.shutdown()
    print(f"{total} formulas typeset; {failures} page(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

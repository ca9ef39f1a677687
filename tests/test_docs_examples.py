"""The ```python blocks of the documentation pages run as written and print what the pages say.

Each page's blocks continue one another, as in a notebook, in a namespace of their own
(```py blocks are shown only, never run).

**The output convention.** A ```python block may be followed, with nothing but blank lines and
an optional marker comment in between, by a ```text block: the block's expected standard
output. The test captures what each block prints and compares it with that text:

- numbers (integers, decimals, exponents, `nan`, `inf`) within `rtol=2e-2` and `atol=1e-3`
  (`|printed - quoted| <= atol + rtol * |quoted|`): the pages quote rounded values, and other
  machines (a GPU, another XLA) round float32 differently;
- every other token exactly (runs of white space count as one space, and a space just inside a
  bracket is ignored, as numpy pads its arrays);
- a block that prints anything must be followed by its ```text block, so that nothing a reader
  sees printed goes unchecked.

A block that needs another tolerance states it in a marker comment between the two blocks (an
HTML comment, so that the site does not show it), e.g. timings that depend on the machine:

    <!-- output: rtol=inf -->

with `rtol=` and / or `atol=` (a number or `inf`).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RTOL = 2e-2  # the default tolerances of a quoted number (see the module docstring)
ATOL = 1e-3

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"\A\s*(?:<!--\s*output:(?P<options>[^>]*?)-->\s*)?\Z")
OPTION = re.compile(r"(rtol|atol)\s*=\s*([0-9.eE+-]+|inf)")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")


@dataclass
class Block:
    code: str
    line: int  # where the block starts on its page (1-based), for messages
    output: str | None = None  # the quoted stdout (the ```text block), if any
    rtol: float = RTOL
    atol: float = ATOL


def blocks(text: str) -> list[Block]:
    """The ```python blocks of a page, each with the ```text block that follows it, if any."""
    fences = list(FENCE.finditer(text))
    found = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        block = Block(fence.group(2), text.count("\n", 0, fence.start()) + 1)
        following = fences[i + 1] if i + 1 < len(fences) else None
        if following is not None and following.group(1) == "text":
            between = MARKER.match(text[fence.end() : following.start()])
            if between is not None:
                block.output = following.group(2)
                for name, value in OPTION.findall(between.group("options") or ""):
                    setattr(block, name, float(value))
        found.append(block)
    return found


def tokens(text: str) -> list[str | float]:
    """`text` as alternating words (white space normalised) and numbers."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"([\[(]) ", r"\1", re.sub(r" ([\])])", r"\1", text))
    parts: list[str | float] = []
    position = 0
    for number in NUMBER.finditer(text):
        parts.append(text[position : number.start()])
        parts.append(float(number.group()))
        position = number.end()
    parts.append(text[position:])
    return parts


def mismatch(printed: str, quoted: str, rtol: float, atol: float) -> str | None:
    """Why `printed` is not `quoted` within the tolerances, or None when it is."""
    got, want = tokens(printed), tokens(quoted)
    if len(got) != len(want):
        return "a different number of numbers"
    for a, b in zip(got, want):
        if isinstance(b, float):
            same = (math.isnan(a) and math.isnan(b)) or (
                a == b or abs(a - b) <= atol + rtol * abs(b)
            )
            if not same:
                return f"printed {a!r} where the page quotes {b!r} (rtol={rtol}, atol={atol})"
        elif a != b:
            return f"printed text {a!r} where the page quotes {b!r}"
    return None


def test_the_comparison_catches_wrong_numbers_and_words():
    """The comparison itself: tolerances, numpy's padding, words exact."""
    assert mismatch("loss: 0.6954826\n", "loss: 0.695\n", RTOL, ATOL) is None
    assert mismatch("[0.76647 0.4785 2.8035 ]", "[0.766 0.479 2.80]", RTOL, ATOL) is None
    assert mismatch("loss: 0.9", "loss: 0.695", RTOL, ATOL) is not None
    assert mismatch("converged: False", "converged: True", RTOL, ATOL) is not None
    assert mismatch("a 1 b 2", "a 1 b", RTOL, ATOL) is not None
    assert mismatch("1.92 ms", "7.5 ms", math.inf, ATOL) is None
    assert mismatch("nan", "nan", RTOL, ATOL) is None
    quoted = "```python\nprint(1)\n```\n\n<!-- output: rtol=0.5 -->\n```text\n1\n```\n"
    [block] = blocks(quoted)
    assert (block.output, block.rtol, block.atol) == ("1\n", 0.5, ATOL)
    [block] = blocks("```python\nprint(1)\n```\n\nSome prose.\n\n```text\n1\n```\n")
    assert block.output is None  # prose in between: not the block's output


GUIDES = sorted(p for p in DOCS.rglob("*.md") if blocks(p.read_text()))


def test_the_guides_have_code():
    assert len(GUIDES) >= 8


@pytest.mark.parametrize("path", GUIDES, ids=[str(p.relative_to(DOCS)) for p in GUIDES])
def test_guide_code_runs_and_prints_what_the_page_quotes(path):
    namespace: dict = {}
    for block in blocks(path.read_text()):
        where = f"{path.relative_to(DOCS)}, the block at line {block.line}"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block.code, str(path), "exec"), namespace)
        printed = printed.getvalue()
        if block.output is None:
            assert not printed, f"{where} prints but quotes no ```text output:\n{printed}"
            continue
        why = mismatch(printed, block.output, block.rtol, block.atol)
        assert why is None, f"{where}: {why}\nprinted:\n{printed}\nquoted:\n{block.output}"

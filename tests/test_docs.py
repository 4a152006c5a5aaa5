"""The result pages' relative links resolve: every [text](path#anchor) in the pages a reader
starts from names a file of the repository and, for a Markdown file, a heading in it
(GitHub's anchor rule). External links (http, https, mailto) are not fetched."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "results/README.md",
    "results/TASKS.md",
    "results/REPORT.md",
    "bench/RESULTS.md",
    "bench/journal.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results" / "journal").glob("*.md")),
]

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _strip_code(text):
    """The text without fenced or indented code blocks and inline code spans."""
    out, fenced, in_code, prev_blank = [], False, False, True
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
            continue
        if fenced:
            out.append("")
            continue
        if not line.strip():
            out.append("")
            prev_blank = True
            continue
        if line.startswith(("    ", "\t")) and (prev_blank or in_code):
            in_code = True
            out.append("")
            continue
        in_code = prev_blank = False
        out.append(re.sub(r"`[^`\n]*`", "", line))
    return "\n".join(out)


def slugs(text):
    """GitHub's heading anchors of a Markdown text: lower case, punctuation other than '-'
    and '_' dropped, spaces to '-', repeats numbered -1, -2, ..."""
    seen, out = {}, set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))   # links keep their text
        s = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path):
    return [m.group(1) for m in _LINK.finditer(_strip_code(path.read_text(encoding="utf-8")))]


def broken_links(page, root=ROOT):
    path = root / page
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if root not in dest.parents and dest != root:
            bad.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return bad


@pytest.mark.parametrize("page", [p for p in PAGES if (ROOT / p).exists()])
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_slug_rule():
    text = "# A title: (issue 19), 2026-12-06 03:38 UTC\n## `cpp` *fused*\n## `cpp` *fused*\n```\n# not a heading\n```\n"
    assert slugs(text) == {"a-title-issue-19-2026-12-06-0338-utc", "cpp-fused", "cpp-fused-1"}


def test_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Here\n[ok](b.md#there) [bad](b.md#nowhere) [gone](c.md) "
                                   "[self](#here) [web](https://example.com)\n\n    [code](x.md)\n")
    (tmp_path / "b.md").write_text("## There\n")
    assert broken_links("a.md", root=tmp_path.resolve()) == ["b.md#nowhere: no heading with anchor #nowhere in b.md",
                                    "c.md: no such file"]

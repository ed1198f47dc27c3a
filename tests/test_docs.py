"""The documentation stays true: relative links and their anchors resolve, every example is linked from the
guide, every guide page is reachable from its index, and the API reference is what tools/api_reference.py
writes from the current docstrings."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GUIDE = ROOT / "docs" / "guide"

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out (links there are examples)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return out


def heading_slug(text: str) -> str:
    """The anchor a code host (GitHub) gives a heading: markup dropped, lower case, punctuation other than
    '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)      # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, with the -1, -2 suffixes of repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            s = heading_slug(m.group(2))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    out |= set(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for i, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), 1):
        for m in _LINK.finditer(line):
            found.append((i, m.group(1) or m.group(2)))
    return found


def broken_links(path: Path) -> list[str]:
    bad = []
    for line, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):    # http:, https:, mailto: -- not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading with anchor #{anchor})")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{where} (an anchor into a file that is not Markdown)")
    return bad


def test_the_guide_and_api_pages_exist():
    assert (GUIDE / "README.md").is_file() and (ROOT / "docs" / "api" / "README.md").is_file()
    assert len(list(GUIDE.glob("*.md"))) >= 20


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def test_the_link_checker_catches_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Title here\n\n## Same\n\n## Same\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#title-here) [ok2](b.md#same-1) [bad](b.md#nowhere) [gone](c.md)\n"
                    "```\n[in code](missing.md)\n```\n[web](https://example.org/x) `[code](x.md)`\n")
    bad = broken_links(page)
    assert len(bad) == 2 and "#nowhere (no heading" in bad[0] and "c.md (no such file)" in bad[1], bad
    assert anchors(tmp_path / "b.md") == {"title-here", "same", "same-1"}
    found = [t for _, t in links(page)]
    assert found == ["b.md#title-here", "b.md#same-1", "b.md#nowhere", "c.md", "https://example.org/x"]
    assert heading_slug("5. `pyquant.ops`: the *op* API") == "5-pyquantops-the-op-api"


def test_every_example_is_linked_from_the_guide():
    text = "\n".join(p.read_text(encoding="utf-8") for p in GUIDE.glob("*.md"))
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "common.py")
    missing = [s for s in scripts if f"examples/{s}" not in text]
    assert missing == []


def test_every_guide_page_is_linked_from_the_index():
    index = (GUIDE / "README.md").read_text(encoding="utf-8")
    linked = {t.partition("#")[0] for _, t in links(GUIDE / "README.md")}
    pages = sorted(p.name for p in GUIDE.glob("*.md") if p.name != "README.md")
    assert [p for p in pages if p not in linked] == [], index[:200]


def _api_reference():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "tools" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    api = _api_reference()
    stale = api.stale(api.build_pages(), ROOT / "docs" / "api")
    assert stale == [], f"docs/api is stale ({stale}): run python tools/api_reference.py"


def test_api_reference_covers_every_public_name():
    api = _api_reference()
    pages = api.build_pages()
    for module, page in api.PAGES.items():
        mod = importlib.import_module(module)
        for name in api.public_names(mod):
            assert f"`{name}`" in pages[page], f"{module}.{name} missing from docs/api/{page}"


def test_api_reference_check_fails_on_a_stale_page(tmp_path):
    api = _api_reference()
    assert api.main(["--out", str(tmp_path)]) == 0
    assert api.main(["--check", "--out", str(tmp_path)]) == 0
    page = tmp_path / "ops.md"
    page.write_text(page.read_text() + "\nedited by hand\n")
    assert api.main(["--check", "--out", str(tmp_path)]) == 1

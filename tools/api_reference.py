"""Writes pyquant's API reference, docs/api/*.md, from the public names and docstrings of its packages.

    python tools/api_reference.py            # (re)write docs/api/
    python tools/api_reference.py --check    # exit 1, naming the stale pages, when docs/api/ is not current

One page per package in PAGES. A package's public names are its `__all__` (or, without one, the functions
and classes it defines); each is documented once, on the page of the listed package nearest to the module
that defines it, and the other pages link there. Functions and classes get their signature and docstring;
a class also gets its public methods and properties. Output is deterministic: object addresses in default
values are dropped, so the same code always gives the same pages.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"

PAGES: dict[str, str] = {
    "pyquant": "pyquant.md",
    "pyquant.techniques": "techniques.md",
    "pyquant.analysis": "analysis.md",
    "pyquant.ops": "ops.md",
    "pyquant.metrics": "metrics.md",
    "pyquant.models": "models.md",
    "pyquant.datasets": "datasets.md",
}

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_VALUE_REPR = 160


def public_names(module: ModuleType) -> list[str]:
    """`__all__`, else the functions and classes the module itself defines (not imported ones), sorted."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return sorted(n for n, v in vars(module).items() if not n.startswith("_")
                  and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__)


def slug(heading: str) -> str:
    """The anchor a code host (GitHub) gives a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def home(obj: Any, exported_by: list[str]) -> str:
    """The page that documents `obj`: among the listed packages exporting it, the one whose name is the
    longest prefix of the module defining it (the first listed on a tie)."""
    where = getattr(obj, "__module__", None) or ""
    best = max(exported_by, key=lambda m: (len(m) if where == m or where.startswith(m + ".") else -1,
                                           -list(PAGES).index(m)))
    return best


def _annotation(a: Any) -> str:
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(v: Any) -> str:
    text = _ADDRESS.sub("", repr(v))
    return "..." if text == "<object object>" else text   # a sentinel: "not given"


def signature(obj: Any, name: str) -> Optional[str]:
    """`name(params) -> return` with annotations as written in the source, one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    parts, star_done = [], False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        if p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{name}({', '.join(parts)}){ret}"
    if len(one_line) <= 100:
        return one_line
    return f"{name}(\n" + "".join(f"    {t},\n" for t in parts) + f"){ret}"


def docstring(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return _ADDRESS.sub("", doc).strip()


def doc_block(obj: Any) -> list[str]:
    """The docstring as a plain-text block (its own line breaks and indentation kept), or nothing."""
    doc = docstring(obj)
    return ["```text", *doc.splitlines(), "```", ""] if doc else []


def first_paragraph(text: str) -> str:
    return text.split("\n\n", 1)[0].replace("\n", " ").strip()


def value_summary(value: Any) -> str:
    """A constant: its type, and its value when short (dict: its keys)."""
    if isinstance(value, dict):
        keys = ", ".join(f"`{k}`" for k in value)
        return f"`dict` with keys {keys}"
    text = _ADDRESS.sub("", repr(value))
    if len(text) <= _MAX_VALUE_REPR:
        return f"`{type(value).__name__}`: `{text}`"
    return f"`{type(value).__name__}`"


def class_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties `cls` defines itself (not those of object, torch or dataclass plumbing)."""
    out = []
    for n, v in vars(cls).items():
        if n.startswith("_"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v) or isinstance(v, property):
            out.append((n, v))
    return out


def render_object(name: str, obj: Any, level: str = "###") -> list[str]:
    lines = [f"{level} {name}", ""]
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        head = f"class {signature(obj, name) or name}" + (f"  # bases: {', '.join(bases)}" if bases else "")
        lines += ["```python", head, "```", ""] + doc_block(obj)
        for mname, member in class_members(obj):
            if isinstance(member, property):
                lines += [f"#### {name}.{mname}", "", "*property*", ""]
            else:
                lines += [f"#### {name}.{mname}", "", "```python", f"def {signature(member, mname) or mname}", "```", ""]
            lines += doc_block(member)
    elif callable(obj):
        lines += ["```python", f"def {signature(obj, name) or name + '(...)'}", "```", ""] + doc_block(obj)
    else:
        lines += [value_summary(obj), ""]
    return lines


def build_pages() -> dict[str, str]:
    """{file name: Markdown text} of every page."""
    modules = {m: importlib.import_module(m) for m in PAGES}
    exported: dict[int, list[str]] = {}
    for m, mod in modules.items():
        for n in public_names(mod):
            obj = getattr(mod, n)
            if not inspect.ismodule(obj) and (inspect.isclass(obj) or callable(obj)):
                exported.setdefault(id(obj), []).append(m)

    pages = {}
    for m, mod in modules.items():
        lines = [f"# {m}", "",
                 "*Generated from the docstrings by `tools/api_reference.py`; do not edit by hand.* "
                 "[All pages](README.md)", ""]
        lines += doc_block(mod)
        body: list[str] = []
        index: list[str] = []
        for n in public_names(mod):
            obj = getattr(mod, n)
            if inspect.ismodule(obj):
                page = PAGES.get(obj.__name__)
                target = f"[`{n}`]({page})" if page else f"`{n}`"
                index.append(f"- {target} (module {obj.__name__}): {first_paragraph(docstring(obj))}")
                continue
            owner = home(obj, exported.get(id(obj), [m])) if (inspect.isclass(obj) or callable(obj)) else m
            if owner != m:
                index.append(f"- [`{n}`]({PAGES[owner]}#{slug(n)}): documented in {owner}")
                continue
            index.append(f"- [`{n}`](#{slug(n)})")
            body += render_object(n, obj)
        lines += ["## Contents", ""] + index + [""] + body
        pages[PAGES[m]] = "\n".join(lines).rstrip() + "\n"
    readme = ["# API reference", "",
              "*Generated from the docstrings by `tools/api_reference.py`; do not edit by hand.* "
              "The user guide is in [docs/guide](../guide/README.md).", ""]
    for m, page in PAGES.items():
        readme.append(f"- [{m}]({page}): {first_paragraph(docstring(modules[m]))}")
    pages["README.md"] = "\n".join(readme) + "\n"
    return pages


def stale(pages: dict[str, str], folder: Path) -> list[str]:
    """The pages whose file in `folder` is missing or differs, and files there no page writes."""
    out = [name for name, text in pages.items()
           if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text]
    out += sorted(p.name for p in folder.glob("*.md") if p.name not in pages) if folder.is_dir() else []
    return out


def write_atomically(path: Path, text: str) -> None:
    """A whole file or none: written beside `path` under a temporary name, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/api/ is not what this script writes")
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    a = p.parse_args(argv)
    pages = build_pages()
    if a.check:
        bad = stale(pages, a.out)
        if bad:
            print(f"{a.out} is stale: {', '.join(bad)}; run python tools/api_reference.py", file=sys.stderr)
            return 1
        print(f"{a.out}: {len(pages)} pages current")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        write_atomically(a.out / name, text)
    for name in stale(pages, a.out):       # pages of packages no longer listed
        (a.out / name).unlink()
    print(f"wrote {len(pages)} pages to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/RESULTS.md is written by several bench scripts: each owns one marked section.

A section is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
:func:`write_section` replaces it (or adds it before the GPU section, else at the end), and
:func:`marked_sections` lets a script that rewrites the whole file keep the others' sections.
"""

from __future__ import annotations

import re
from pathlib import Path

from chip.utils import atomic_write

_SECTION = re.compile(r"<!-- (?P<name>[\w-]+):start -->\n.*?<!-- (?P=name):end -->\n", re.S)
_BEFORE = "## GPU check"


def _marked(name: str, body: str) -> str:
    return f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->\n"


def marked_sections(path: Path) -> list[str]:
    """Every marked section of ``path`` (none when it does not exist), in order."""
    text = path.read_text() if path.is_file() else ""
    return [m.group(0) for m in _SECTION.finditer(text)]


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` into section ``name`` of ``path`` (created with a '# Results' title)."""
    text = path.read_text() if path.is_file() else "# Results\n"
    block = _marked(name, body)
    found = [m for m in _SECTION.finditer(text) if m.group("name") == name]
    if found:
        text = text[: found[0].start()] + block + text[found[0].end() :]
    elif _BEFORE in text:
        i = text.index(_BEFORE)
        text = text[:i] + block + "\n" + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(text)

"""A built-in corpus that needs no download: the Python standard library's own documentation.

Documents are the pydoc topic texts (``pydoc_data.topics``) and the docstrings of the
standard library's modules, classes and functions, read from source with ``ast`` (nothing
is imported or executed). Every Python install ships them; the text is English prose with
code, a few MB in all.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from deberta_ds.atomic_files import atomic_path


def _paragraphs(text: str):
    """Split a docstring into paragraphs of joined lines (blank lines separate them)."""
    paragraph: list[str] = []
    for line in text.splitlines():
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def _docstrings(source_file: Path):
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc


def iter_documents(min_chars: int = 40):
    """Documents as single lines of text, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for paragraph in _paragraphs(topics[name]):
            if len(paragraph) >= min_chars:
                yield paragraph
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.rglob("*.py")):
        relative = source.relative_to(stdlib).parts
        if relative[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in relative:
            continue
        for doc in _docstrings(source):
            text = " ".join(_paragraphs(doc))
            if len(text) >= min_chars:
                yield text


def write_default_corpus(path: str | Path, max_bytes: int | None = None) -> Path:
    """Write one document per line to `path` (atomically); stop after about max_bytes."""
    path = Path(path)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for doc in iter_documents():
            out.write(doc + "\n")
            written += len(doc) + 1
            if max_bytes is not None and written >= max_bytes:
                break
    return path

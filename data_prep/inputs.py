"""Streaming document readers over files, globs and directories (plain text, JSONL, gzip).

Documents are yielded as raw UTF-8 byte *pieces* so memory stays bounded by
``max_piece_bytes`` whatever a line's length: a document longer than that is cut into
several pieces (at the last space, never inside a UTF-8 character), counted as "split".
Each piece carries the input position after it, so tokenisation can resume from there.
"""

from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("text", "jsonl")
DOC_BOUNDARIES = ("line", "blank-line")


JSON_LINE_LIMIT = 256 << 20  # a JSONL record longer than this is skipped (and counted)


@dataclass(frozen=True)
class Piece:
    data: bytes | None  # raw UTF-8 (possibly malformed) text; None for an unusable record (skipped)
    ends_document: bool
    file_index: int    # which input file ...
    offset: int        # ... and the (uncompressed) byte offset just after this piece


def expand_inputs(patterns) -> list[Path]:
    """Files, globs and directories (recursively, sorted) -> a deterministic list of files."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        elif path.is_file():
            matches = [path]
        else:
            raise FileNotFoundError(f"--input {pattern}: no such file, directory or glob match")
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: matched no files")
        files.extend(matches)
    return files


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _utf8_safe_cut(data: bytes) -> int:
    """Largest cut <= len(data) that does not split a UTF-8 character, preferring the last space."""
    space = data.rfind(b" ")
    if space > 0:
        return space + 1
    cut = len(data)
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:  # continuation bytes
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:                # a lead byte whose character is cut off
        cut -= 1
    return cut or len(data)


class DocumentReader:
    """Yields Pieces from one input file, starting at `start_offset` (a document boundary)."""

    def __init__(self, path: Path, file_index: int, fmt: str, doc_boundary: str, json_key: str,
                 max_piece_bytes: int, start_offset: int = 0):
        self.path, self.file_index, self.fmt = path, file_index, fmt
        self.doc_boundary, self.json_key, self.max_piece_bytes = doc_boundary, json_key, max_piece_bytes
        self.start_offset = start_offset

    def __iter__(self):
        with open_binary(self.path) as handle:
            if self.start_offset:
                handle.seek(self.start_offset)
            if self.fmt == "jsonl":
                yield from self._jsonl(handle)
            else:
                yield from self._text(handle)

    def _text(self, handle):
        pending = b""              # bytes of the current document not yet emitted
        split = False              # the current document already emitted a piece
        limit = self.max_piece_bytes
        while True:
            line = handle.readline(limit)
            at_eof = not line
            complete_line = line.endswith(b"\n")
            if self.doc_boundary == "line":
                pending += line.rstrip(b"\r\n") if complete_line else line
                ends = complete_line or at_eof
            else:
                blank = complete_line and not line.strip()
                ends = blank or at_eof
                if not blank:
                    pending += line
            while len(pending) > limit:  # a huge document: emit a bounded piece, keep the rest
                cut = _utf8_safe_cut(pending[:limit])
                yield Piece(pending[:cut], False, self.file_index, handle.tell())
                pending, split = pending[cut:], True
            # Line mode: an empty line is an (empty, counted) document; blank-line mode: a separator.
            if ends and (pending.strip() or split or (self.doc_boundary == "line" and not at_eof)):
                yield Piece(pending.strip(), True, self.file_index, handle.tell())
            if ends:
                pending, split = b"", False
            if at_eof:
                return

    def _jsonl(self, handle):
        while True:
            line = handle.readline(JSON_LINE_LIMIT)
            if not line:
                return
            if not line.strip():
                continue
            if not line.endswith(b"\n") and handle.peek(1):  # a record too long to hold: skip the rest
                while (rest := handle.readline(JSON_LINE_LIMIT)) and not rest.endswith(b"\n"):
                    pass
                yield Piece(None, True, self.file_index, handle.tell())
                continue
            try:
                record = json.loads(line)
                text = record[self.json_key]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                yield Piece(None, True, self.file_index, handle.tell())  # counted as skipped downstream
                continue
            data = text.encode("utf-8", errors="surrogatepass")
            while len(data) > self.max_piece_bytes:
                cut = _utf8_safe_cut(data[:self.max_piece_bytes])
                yield Piece(data[:cut], False, self.file_index, handle.tell())
                data = data[cut:]
            yield Piece(data, True, self.file_index, handle.tell())


def iterate_pieces(files: list[Path], fmt: str, doc_boundary: str, json_key: str, max_piece_bytes: int,
                   start_file: int = 0, start_offset: int = 0):
    """All pieces of all files in order, from (start_file, start_offset)."""
    for index in range(start_file, len(files)):
        reader = DocumentReader(files[index], index, fmt, doc_boundary, json_key, max_piece_bytes,
                                start_offset if index == start_file else 0)
        yield from reader

"""Streaming input over files, globs and directories (plain text, JSONL, gzip).

The main process only cuts the byte stream into *blocks* that end at a document boundary
(a newline; a blank line in blank-line mode), so splitting, JSON parsing and decoding
happen in the workers. Memory stays bounded by ``max_piece_bytes`` whatever a document's
length: a text document longer than that is emitted as several *pieces*, cut at the last
space (never inside a UTF-8 character) at positions counted from the document's own start,
so the cuts do not depend on where reading started. A JSONL record longer than
JSON_LINE_LIMIT cannot be cut and is skipped (and counted).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from deberta_ds.data.paths import expand_path
from deberta_ds.errors import MissingInputError, UserError

FORMATS = ("auto", "text", "jsonl")
DOC_BOUNDARIES = ("line", "blank-line")
READ_BYTES = 1 << 20
JSON_LINE_LIMIT = 256 << 20
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Block:
    data: bytes
    kind: str          # "docs": whole documents; "piece": part of one long document; "skip": an unusable record
    continues: bool    # the first document finishes the long document of the previous "piece" blocks
    file_index: int
    start: int         # uncompressed byte offset of data[0] in its file


CORPUS_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl"}  # each also as .gz
SNIFF_BYTES = 1 << 16


def expand_inputs(patterns, skipped: list | None = None) -> list[Path]:
    """Files, globs and directories (recursively, sorted) -> a deterministic list of files. From a
    directory only corpus files are taken (CORPUS_SUFFIXES, plain or .gz: not the tokenizer or the
    shards that may sit beside them); the others are appended to `skipped`. Named files and glob
    matches are taken as given."""
    files: list[Path] = []
    for pattern in patterns:
        def corpus_files(directory: Path) -> list[Path]:
            found = _visible_files(directory)
            if skipped is not None:
                skipped.extend(p for p in sorted(found) if corpus_format(p) is None)
            return [p for p in found if corpus_format(p) is not None]

        matches = [Path(p) for p in expand_path(pattern, corpus_files, keep=lambda match: Path(match).is_file())]
        if matches == [Path(pattern)] and not Path(pattern).is_file():
            raise MissingInputError(f"--input {pattern}: no such file, directory or glob match")
        if not matches:
            what = (f"no corpus files ({', '.join(f'*{s}' for s in CORPUS_SUFFIXES)}, or .gz of them) in this folder"
                    if Path(pattern).is_dir() else "matched no files")
            raise MissingInputError(f"--input {pattern}: {what}")
        files.extend(matches)
    return files


def corpus_format(path: Path) -> str | None:
    """The format a file's extension names (text, jsonl; .gz looked through), or None."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return CORPUS_SUFFIXES.get(suffixes[0].lower()) if suffixes and suffixes[0] != ".gz" else None


def resolve_format(files: list[Path], given: str) -> tuple[str, str]:
    """(format, why) for the input: --format when given, else each file's extension, else its content
    (a first line that is a JSON object: jsonl). Files of both formats in one job are an error."""
    if given != "auto":
        return given, "from --format"
    reasons = {}
    for file in files:
        fmt = corpus_format(file)
        reason = f"from the extension of {file.name}" if fmt else f"from the content of {file.name}"
        reasons.setdefault(fmt or _sniffed_format(file), reason)
    if len(reasons) > 1:
        raise UserError("--input holds both text and JSONL files; tokenise each format on its own, or give "
                        "--format text|jsonl for all")
    return next(iter(reasons.items()))


def _sniffed_format(path: Path) -> str:
    with open_binary(path) as handle:
        head = read_checked(handle, path, SNIFF_BYTES)
    first = next((line for line in head.split(b"\n")[:-1] if line.strip()), b"")
    try:
        return "jsonl" if isinstance(json.loads(first), dict) else "text"
    except ValueError:
        return "text"


def check_text(files: list[Path], max_malformed: float) -> None:
    """Each file's first 64 KiB must look like UTF-8 text: no NUL byte (a binary file: a model, an
    archive, random bytes) and at most `max_malformed` of its lines with invalid UTF-8."""
    for path in files:
        with open_binary(path) as handle:
            head = read_checked(handle, path, SNIFF_BYTES)
        lines = head.removesuffix(b"\n").split(b"\n")
        if len(head) == SNIFF_BYTES:  # the last line is cut short: judge it up to a character boundary
            lines[-1] = lines[-1][:_utf8_safe_cut(lines[-1])]
        malformed = sum(not is_utf8(line) for line in lines)
        if b"\0" in head or malformed > max_malformed * max(len(lines), 1):
            what = "NUL bytes" if b"\0" in head else f"{malformed} of {len(lines)} lines are not valid UTF-8"
            raise UserError(f"--input {path}: not UTF-8 text ({what} in its first {len(head):,} bytes: a binary "
                            "file, or another encoding); remove it from --input or convert it to UTF-8"
                            + ("" if b"\0" in head else " (or raise --max-malformed)"))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_checked(handle, path: Path, size: int) -> bytes:
    """handle.read(size), a damaged .gz named as such (not a traceback, not a 'disk full')."""
    try:
        return handle.read(size)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"--input {path}: a damaged gzip file ({error}); re-download or re-compress it (gzip -t "
                        "tests one)") from None


def _visible_files(directory: Path) -> list[Path]:
    """A directory's files, recursively, without hidden ones (editor swap files, .DS_Store)."""
    return [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]


def text_size(path: Path) -> int:
    """The bytes a file's text spans (the progress bar's total, for its ETA): a .gz's uncompressed size
    from its trailer (ISIZE, the size modulo 2^32: taken as the smallest such size not below the
    compressed one, an estimate past 4 GiB)."""
    size = path.stat().st_size
    if path.suffix != ".gz" or size < 18:
        return size
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        isize = int.from_bytes(handle.read(4), "little")
    return isize + max(0, -(-(size - isize) // 2 ** 32)) * 2 ** 32


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _utf8_safe_cut(data: bytes) -> int:
    """Cut point <= len(data) after the last space, else not inside a UTF-8 character."""
    space = data.rfind(b" ")
    if space > 0:
        return space + 1
    cut = len(data)
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:  # continuation bytes
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:                # a lead byte whose character is cut off
        cut -= 1
    return cut or len(data)


def _last_boundary(buffer: bytes, blank_lines: bool) -> int:
    """Index just after the last document boundary in buffer, or 0."""
    if not blank_lines:
        return buffer.rfind(b"\n") + 1
    last = 0
    for match in _BLANK_LINE.finditer(buffer, max(0, len(buffer) - READ_BYTES - 4096)):
        last = match.end()
    return last


def iterate_blocks(files: list[Path], fmt: str, doc_boundary: str, max_piece_bytes: int,
                   start_file: int = 0, start_offset: int = 0):
    """Blocks of all files in order, starting at (start_file, start_offset), a document boundary."""
    blank_lines = fmt == "text" and doc_boundary == "blank-line"
    for index in range(start_file, len(files)):
        with open_binary(files[index]) as handle:
            position = start_offset if index == start_file else 0
            handle.seek(position)
            buffer, continuing = b"", False
            while True:
                chunk = read_checked(handle, files[index], READ_BYTES)
                buffer += chunk
                cut = _last_boundary(buffer, blank_lines) if chunk else len(buffer)
                if cut:
                    yield Block(buffer[:cut], "docs", continuing, index, position)
                    buffer, position, continuing = buffer[cut:], position + cut, False
                if fmt == "jsonl" and len(buffer) > JSON_LINE_LIMIT:
                    skipped = len(buffer) + _skip_line(handle)
                    yield Block(b"", "skip", False, index, position)
                    buffer, position = b"", position + skipped
                if fmt == "text" and len(buffer) > max_piece_bytes:  # a long document: emit its pieces
                    *pieces, buffer = cut_pieces(buffer, max_piece_bytes)
                    for piece in pieces:
                        yield Block(piece, "piece", continuing, index, position)
                        position, continuing = position + len(piece), True
                if not chunk:
                    break


def _skip_line(handle) -> int:
    """Consume the rest of the current line; returns the bytes skipped."""
    skipped = 0
    while chunk := handle.readline(READ_BYTES):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def split_block(block: Block, fmt: str, doc_boundary: str, json_key: str):
    """(text bytes | None, end offset) per document of a block; None marks an unusable record.

    Line mode keeps empty lines as (empty) documents; blank-line mode treats runs of blank
    lines as one separator; JSONL skips blank lines. The first document of a block that
    `continues` a long document is always kept, even empty: it ends that document.
    """
    if block.kind == "piece":
        return [(block.data, block.start + len(block.data))]
    if block.kind == "skip":
        return [(None, block.start)]
    if fmt == "text" and doc_boundary == "blank-line":
        spans, begin = [], 0
        for match in _BLANK_LINE.finditer(block.data):
            spans.append((begin, match.start(), match.end()))
            begin = match.end()
        spans.append((begin, len(block.data), len(block.data)))
        # Not stripped: piece cuts count from the raw document start (SentencePiece ignores the edges).
        documents = [(block.data[b:e], block.start + after) for b, e, after in spans]
        return [doc for i, doc in enumerate(documents) if doc[0].strip() or (i == 0 and block.continues)]
    lines = block.data.split(b"\n")
    if lines[-1] == b"":  # the block's final newline ends its last line, it does not start one
        lines.pop()
    # Input offset just after each line's newline (as if there were one after an unterminated last line).
    ends = [block.start + end for end in itertools.accumulate(len(line) + 1 for line in lines)]
    if b"\r" in block.data:
        lines = [line.rstrip(b"\r") for line in lines]
    if fmt == "text":
        return list(zip(lines, ends))
    return [(_json_text(line, json_key), end) for line, end in zip(lines, ends) if line.strip()]


def cut_pieces(data: bytes, max_piece_bytes: int) -> list[bytes]:
    """The pieces of a document: the same cuts `iterate_blocks` makes while streaming, so a long
    document is cut identically whether it arrived whole or already in pieces."""
    pieces = []
    while len(data) > max_piece_bytes:
        cut = _utf8_safe_cut(data[:max_piece_bytes])
        pieces.append(data[:cut])
        data = data[cut:]
    return pieces + [data]


_JSON_DECODER = json.JSONDecoder()


def _json_text(line: bytes, json_key: str) -> bytes | None:
    """The text under json_key of a one-line JSON object, as UTF-8 bytes (lone surrogates from
    \\u escapes kept, so decoding reports them); None for anything else. Same result as
    json.loads on a UTF-8 line, without its per-call encoding detection (this runs per record)."""
    try:
        record = line.decode("utf-8").removeprefix("\ufeff").strip(" \t\r\n")
        value, end = _JSON_DECODER.raw_decode(record)
        text = value[json_key] if end == len(record) else None
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    return text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else None

"""Where shards come from: the manifest every data_prep output carries, read whenever shards are
opened (training, verify, inspect, merge, split, mixture). data_prep writes it; this module is its
one reader and names its files.

A tokenize job's manifest is PREFIX.manifest.json for its shards PREFIX_00000, PREFIX_00001, ...;
merge, split and `data_prep manifest` write one beside each shard they produce (PREFIX.manifest.json
for PREFIX.bin/.idx). A manifest records the tokenizer's hash, whether the job finished, and each
finished shard's files (sizes and content hashes, deberta_ds.content_hash): readers check the size
and a sampled hash on every open, `verify`, merge and split the hash of every byte. A shard without
a manifest, or one its manifest does not list, is refused by name: nothing is read unvouched for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deberta_ds.atomic_files import write_atomic
from deberta_ds.content_hash import check_file, file_record
from deberta_ds.data.indexed_dataset import data_path, index_path
from deberta_ds.errors import UserError

VERSION = 1
RECORD_COMMAND = "python -m data_prep manifest PREFIX --tokenizer TOK"


def manifest_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.manifest.json")


def shard_prefix(prefix: str | Path, index: int) -> str:
    return f"{prefix}_{index:05d}"


def job_prefix(shard: str | Path) -> str | None:
    """The output prefix of the tokenize job that wrote `shard` (shard_prefix's inverse), or None."""
    match = re.fullmatch(r"(.*)_\d{5}", str(shard))
    return match[1] if match else None


def shard_files(prefix: str | Path) -> dict:
    """What a manifest records of a finished shard's files (sizes and hashes)."""
    return {"bin": file_record(data_path(prefix)), "idx": file_record(index_path(prefix))}


def shard_entry(prefix: str | Path, documents: int, tokens: int) -> dict:
    return {"prefix": str(prefix), "documents": documents, "tokens": tokens, "files": shard_files(prefix)}


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")


def record_output(prefix: str | Path, kind: str, tokenizer_sha256: str, documents: int, tokens: int,
                  sources: dict) -> None:
    """The manifest of one finished shard written by merge, split or `data_prep manifest`."""
    write_manifest(manifest_path(prefix), {"version": VERSION, "kind": kind, "tokenizer_sha256": tokenizer_sha256,
                                           "complete": True, "sources": sources,
                                           "shards": [shard_entry(prefix, documents, tokens)]})


def release_output(prefix: str | Path) -> None:
    """Before merge/split (re)write the shard PREFIX: drop its old manifest, so a kill between the new
    shard and its new manifest leaves a shard that is refused as unrecorded, never one that passes
    for the old. A manifest that records other shards (a tokenize job's) is not ours to replace, nor is
    a shard its tokenize job's manifest lists (PREFIX = JOB_00001)."""
    job = job_prefix(prefix)
    if job and manifest_path(job).exists():
        listed = [Path(entry["prefix"]).name for entry in read_manifest(manifest_path(job))["shards"]]
        if Path(prefix).name in listed:
            raise UserError(f"{manifest_path(job)}: lists {prefix} as a shard of its tokenize job; choose another "
                            f"--output-prefix than {prefix}")
    path = manifest_path(prefix)
    if not (path.exists() or path.is_symlink()):
        return
    manifest = read_manifest(path)
    if [Path(entry["prefix"]).name for entry in manifest["shards"]] != [Path(prefix).name]:
        raise UserError(f"{path}: holds the manifest of other shards (a {manifest.get('kind', 'tokenize')} job's); "
                        f"choose another --output-prefix than {prefix}")
    path.unlink()


# ---------------------------------------------------------------- reading and checking a manifest

def read_manifest(path: Path) -> dict:
    """A manifest, every field it must have checked for its type; anything else is an error naming
    the file (and the field)."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path}: a dangling symbolic link (to {path.readlink()}), not a shard manifest; restore "
                        "the file it pointed to or re-run the data_prep command that wrote these shards")
    if path.is_dir():
        raise UserError(f"{path}: a directory stands where the shard manifest belongs; remove it and re-run the "
                        "data_prep command that wrote these shards")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        manifest = error
    if not isinstance(manifest, dict):
        detail = manifest if isinstance(manifest, Exception) else f"got {type(manifest).__name__}"
        raise UserError(f"{path}: damaged, not a shard manifest (a JSON object with a 'shards' list: {detail}); "
                        "re-run the data_prep command that wrote these shards into a fresh --output-prefix")
    _check_fields(path, manifest)
    return manifest


_TYPE_NAMES = {list: "a list", bool: "true or false", str: "a string", int: "an integer", dict: "an object"}


def _field(path: Path, holder: dict, key: str, kind: type, where: str = ""):
    """holder[key] of type `kind` (an int is never a bool); an error naming the field otherwise."""
    value = holder.get(key)
    if key not in holder or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = "it is missing" if key not in holder else f"got {type(value).__name__} {json.dumps(value)[:60]}"
        raise UserError(f"{path}: field '{where}{key}' must be {_TYPE_NAMES[kind]} ({got}); the manifest is "
                        "damaged: re-run the data_prep command that wrote these shards")
    return value


def _check_fields(path: Path, manifest: dict) -> None:
    shards = _field(path, manifest, "shards", list)
    _field(path, manifest, "complete", bool)
    _field(path, manifest, "tokenizer_sha256", str)
    if not shards:
        raise UserError(f"{path}: lists no shards ('shards': []), so it vouches for none; re-run the data_prep "
                        "command that wrote these shards")
    for i, entry in enumerate(shards):
        where = f"shards[{i}]."
        if not isinstance(entry, dict):
            raise UserError(f"{path}: field 'shards[{i}]' must be an object (got {type(entry).__name__})")
        _field(path, entry, "prefix", str, where)
        for key in ("documents", "tokens"):
            _field(path, entry, key, int, where)
        files = _field(path, entry, "files", dict, where)
        for name in ("bin", "idx"):
            record = _field(path, files, name, dict, f"{where}files.")
            _field(path, record, "bytes", int, f"{where}files.{name}.")
            for key in ("sha256", "sampled_sha256"):
                _field(path, record, key, str, f"{where}files.{name}.")


def manifest_of(shard: str | Path) -> Path:
    """The manifest that vouches for `shard`: its own (merge, split, recorded), else its tokenize job's."""
    job = job_prefix(shard)
    candidates = [manifest_path(shard)] + ([manifest_path(job)] if job else [])
    for path in candidates:
        if path.exists() or path.is_symlink():
            return path
    raise UserError(f"{shard}: no manifest ({' or '.join(map(str, candidates))} missing); every data_prep output "
                    "has one. Re-run the command that wrote these shards, or for shards made elsewhere (Megatron's "
                    f"preprocess_data.py) check and record them: {RECORD_COMMAND}")


def check_provenance(prefixes, tokenizer_sha256: str | None, allow_incomplete: bool = False, warn=print,
                     full: bool = False) -> set[str]:
    """Every shard must be listed, with its files, in its manifest (`manifest_of`). Refuse shards of
    a job that did not finish (with allow_incomplete: warn instead), shards made with another
    tokenizer than `tokenizer_sha256` (None: any), naming both hashes, and shard files that differ
    from what was recorded (full: every byte hashed; otherwise the size and a sampled hash).
    Returns the tokenizer hashes the manifests record."""
    groups: dict[Path, list[Path]] = {}
    for prefix in prefixes:
        groups.setdefault(manifest_of(prefix), []).append(Path(prefix))
    hashes = set()
    for path, shards in groups.items():
        manifest = read_manifest(path)
        hashes.add(manifest["tokenizer_sha256"])
        if tokenizer_sha256 and manifest["tokenizer_sha256"] != tokenizer_sha256:
            raise UserError(f"{path}: these shards were tokenised with tokenizer sha256 "
                            f"{manifest['tokenizer_sha256']}, not with the given one ({tokenizer_sha256}); "
                            "use the tokenizer they were made with, or tokenise again")
        if not manifest["complete"]:
            message = (f"{path}: the tokenize job that wrote these shards did not finish "
                       f"({len(manifest['shards'])} shards so far); re-run the same tokenize command to "
                       "finish it")
            if not allow_incomplete:
                raise UserError(message + " (or accept the incomplete set: data.allow_incomplete_shards=true for "
                                          "training, --allow-incomplete for verify)")
            warn(f"warning: {message}; using the incomplete set as asked")
        _check_contents(path, manifest, shards, full)
    return hashes


def _check_contents(path: Path, manifest: dict, shards: list[Path], full: bool) -> None:
    """Each of `shards` is listed in the manifest (found beside it, wherever the job wrote it), and
    its files are what was recorded."""
    listed = {path.parent / Path(entry["prefix"]).name: entry for entry in manifest["shards"]}
    for prefix in shards:
        entry = listed.get(prefix)
        if entry is None:
            names = sorted(p.name for p in listed)
            raise UserError(f"{prefix}: not listed in {path} (it lists {', '.join(names[:5])}"
                            f"{', ...' if len(names) > 5 else ''}): a shard this job did not write, or one left "
                            "from an earlier run; remove it, or re-run the command into a fresh --output-prefix")
        for file, record in ((data_path(prefix), entry["files"]["bin"]), (index_path(prefix), entry["files"]["idx"])):
            try:
                check_file(file, record, full)
            except UserError as error:
                raise UserError(f"{error}; recorded in {path}. Re-run the command that wrote it (or restore the "
                                "file from a copy)") from None

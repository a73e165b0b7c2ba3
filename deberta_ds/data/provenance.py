"""Where shards come from: the manifest a tokenize job writes beside its shards
(PREFIX.manifest.json for PREFIX_00000, PREFIX_00001, ...), read when shards are opened for
training or verified. data_prep writes it; this module is its one reader and names its files.
Each finished shard's entry records its files' sizes and content hashes (deberta_ds.content_hash):
training checks the size and a sampled hash on every open, `verify` the hash of every byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deberta_ds.content_hash import check_file, file_record
from deberta_ds.data.indexed_dataset import data_path, index_path
from deberta_ds.errors import UserError


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


def read_manifest(path: Path) -> dict:
    """A tokenize job's manifest; a damaged one is an error naming it."""
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        manifest = error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        detail = manifest if isinstance(manifest, Exception) else f"got {type(manifest).__name__}"
        raise UserError(f"{path}: damaged, not a tokenize manifest (a JSON object with a 'shards' list: {detail}); "
                        "re-run the tokenize command that wrote these shards into a fresh --output-prefix")
    return manifest


def check_provenance(prefixes, tokenizer_sha256: str | None, allow_incomplete: bool = False, warn=print,
                     full: bool = False) -> None:
    """Shards written by `tokenize` have their job's manifest beside them (PREFIX_00000 ->
    PREFIX.manifest.json). Refuse shards of a job that did not finish (with allow_incomplete:
    warn instead), shards made with another tokenizer than `tokenizer_sha256`, naming both
    hashes, and shard files that differ from what the job recorded (full: every byte hashed;
    otherwise the size and a sampled hash). Shards without a manifest (merge/split outputs,
    Megatron's own) are not judged here."""
    jobs = {job_prefix(prefix) for prefix in prefixes} - {None}
    for job in sorted(jobs, key=str):
        path = manifest_path(job)
        if not path.is_file():
            continue
        manifest = read_manifest(path)
        if tokenizer_sha256 and manifest.get("tokenizer_sha256") != tokenizer_sha256:
            raise UserError(f"{path}: these shards were tokenised with tokenizer sha256 "
                             f"{manifest.get('tokenizer_sha256')}, not with the given one ({tokenizer_sha256}); "
                             "use the tokenizer they were made with, or tokenise again")
        if not manifest.get("complete"):
            message = (f"{path}: the tokenize job that wrote these shards did not finish "
                       f"({len(manifest['shards'])} shards so far); re-run the same tokenize command to "
                       "finish it")
            if not allow_incomplete:
                raise UserError(message + " (or accept the incomplete set: data.allow_incomplete_shards=true for "
                                           "training, --allow-incomplete for verify)")
            warn(f"warning: {message}; using the incomplete set as asked")
        _check_contents(path, manifest, {Path(prefix) for prefix in prefixes}, full)


def _check_contents(path: Path, manifest: dict, prefixes: set, full: bool) -> None:
    """The recorded shards among `prefixes` (found beside the manifest, wherever the job wrote them)."""
    for entry in manifest["shards"]:
        prefix = path.parent / Path(entry["prefix"]).name
        if prefix not in prefixes or "files" not in entry:  # not asked for, or recorded before hashes were
            continue
        for file, record in ((data_path(prefix), entry["files"]["bin"]), (index_path(prefix), entry["files"]["idx"])):
            try:
                check_file(file, record, full)
            except UserError as error:
                raise UserError(f"{error}; recorded in {path}. Tokenise again (or restore the file from a copy)") \
                    from None

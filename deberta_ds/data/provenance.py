"""Where shards come from: the manifest a tokenize job writes beside its shards
(PREFIX.manifest.json for PREFIX_00000, PREFIX_00001, ...), read when shards are opened for
training or verified. data_prep writes it; this module is its one reader and names its files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deberta_ds.errors import UserError


def manifest_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.manifest.json")


def shard_prefix(prefix: str | Path, index: int) -> str:
    return f"{prefix}_{index:05d}"


def job_prefix(shard: str | Path) -> str | None:
    """The output prefix of the tokenize job that wrote `shard` (shard_prefix's inverse), or None."""
    match = re.fullmatch(r"(.*)_\d{5}", str(shard))
    return match[1] if match else None


def check_provenance(prefixes, tokenizer_sha256: str | None, allow_incomplete: bool = False, warn=print) -> None:
    """Shards written by `tokenize` have their job's manifest beside them (PREFIX_00000 ->
    PREFIX.manifest.json). Refuse shards of a job that did not finish (with allow_incomplete:
    warn instead) and shards made with another tokenizer than `tokenizer_sha256`, naming both
    hashes. Shards without a manifest (merge/split outputs, Megatron's own) are not judged here."""
    jobs = {job_prefix(prefix) for prefix in prefixes} - {None}
    for path in sorted(manifest_path(job) for job in jobs):
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        if tokenizer_sha256 and manifest.get("tokenizer_sha256") != tokenizer_sha256:
            raise UserError(f"{path}: these shards were tokenised with tokenizer sha256 "
                             f"{manifest.get('tokenizer_sha256')}, not with the given one ({tokenizer_sha256}); "
                             "use the tokenizer they were made with, or tokenise again")
        if not manifest.get("complete"):
            message = (f"{path}: the tokenize job that wrote these shards did not finish "
                       f"({len(manifest.get('shards', []))} shards so far); re-run the same tokenize command to "
                       "finish it")
            if not allow_incomplete:
                raise UserError(message + " (or accept the incomplete set: data.allow_incomplete_shards=true for "
                                           "training, --allow-incomplete for verify)")
            warn(f"warning: {message}; using the incomplete set as asked")

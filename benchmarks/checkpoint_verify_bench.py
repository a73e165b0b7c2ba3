"""What the content hashes cost: sha256 of a checkpoint's files when it is saved (COMPLETE) and
loaded (every load), and of a shard in `verify`; the sampled hash training checks on every open.

Writes --gb GiB of random bytes as a few checkpoint-sized files in --dir (default: a temporary
folder), then times `deberta_ds.training.checkpoint.file_records` (what save records) and
`verify` (what every load checks), and `sampled_sha256` per file. The files were just written,
so the reads come from the page cache: this is the hashing cost; a cold read is bounded by the
disk as well.

    python benchmarks/checkpoint_verify_bench.py [--gb 2] [--dir /fast/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deberta_ds import checkpoint_reader as checkpoint  # noqa: E402
from deberta_ds.content_hash import sampled_sha256  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="GiB of checkpoint files (default 2)")
    parser.add_argument("--dir", help="where to write them (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / checkpoint.tag_for(1)
        (folder / "discriminator").mkdir(parents=True)
        total, files = int(args.gb * 2 ** 30), 4
        for index in range(files):
            with open(folder / "discriminator" / f"part{index}.pt", "wb") as handle:
                for _ in range(total // files // 2 ** 24):
                    handle.write(os.urandom(2 ** 24))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        started = time.perf_counter()
        records = checkpoint.file_records(folder)
        record_s = time.perf_counter() - started
        (folder / checkpoint.COMPLETE).write_text(json.dumps({"files": records}))
        started = time.perf_counter()
        checkpoint.verify(folder)
        verify_s = time.perf_counter() - started
        started = time.perf_counter()
        for path in folder.rglob("*.pt"):
            sampled_sha256(path)
        sampled_ms = (time.perf_counter() - started) * 1000 / files
    print(json.dumps({"bytes": size, "record_gb_per_s": round(size / record_s / 1e9, 2),
                      "verify_gb_per_s": round(size / verify_s / 1e9, 2),
                      "sampled_hash_ms_per_file": round(sampled_ms, 2), "cpu": os.cpu_count()}))


if __name__ == "__main__":
    main()

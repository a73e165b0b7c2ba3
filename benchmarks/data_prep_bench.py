"""Tokenisation and loader throughput.

Peers, in the same run: bare SentencePiece `encode` in one process on the same text (the
practical per-core ceiling), and the whole `python -m data_prep tokenize` command with 1
and 2 workers (start-up included). Peak RSS is the largest summed RSS of the tokenize
process tree, sampled every 20 ms.

    python benchmarks/data_prep_bench.py [--source FILE] [--mb 50] [--large-mb 500]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.tokenizer import train_tokenizer  # noqa: E402
from deberta_ds.data.dataset import MaskingConfig, PretrainingSamples, TokenCorpus, special_ids  # noqa: E402
from deberta_ds.data.mixture import MixtureSamples  # noqa: E402
from deberta_ds.data.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "corpora" / "wikitext-2" / "test.txt"


def make_jsonl(source: Path, out: Path, megabytes: int) -> Path:
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    written = 0
    with open(out, "w", encoding="utf-8") as handle:
        while written < megabytes << 20:
            for line in lines:
                record = json.dumps({"text": line}) + "\n"
                handle.write(record)
                written += len(record)
    return out


def run_measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak summed RSS (MB) of the process tree."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    if process.returncode:
        raise RuntimeError(f"{command} failed with {process.returncode}")
    return time.perf_counter() - start, peak / 2 ** 20


def read_texts(jsonl: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]


def text_megabytes(texts: list[str]) -> float:
    """MB of document text (what the peers encode; the JSONL file adds its JSON syntax)."""
    return sum(len(text.encode()) for text in texts) / 2 ** 20


def _per_text_seconds(model: Path, texts: list[str]) -> float:
    """Seconds to encode `texts` one per call (how a plain Python loop, e.g. Megatron's
    preprocess script, calls SentencePiece)."""
    processor = spm.SentencePieceProcessor(model_file=str(model))
    start = time.perf_counter()
    for text in texts:
        processor.encode(text)
    return time.perf_counter() - start


def encode_rates(model: Path, texts: list[str], megabytes: float) -> tuple[float, float]:
    """MB/s of bare SentencePiece in one process: batched (1000 texts a call, one thread) and one
    text per call."""
    processor = spm.SentencePieceProcessor(model_file=str(model))
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        processor.encode(texts[i:i + 1000], num_threads=1)
    return megabytes / (time.perf_counter() - start), megabytes / _per_text_seconds(model, texts)


def concurrent_encode_rate(model: Path, texts: list[str], megabytes: float, processes: int = 2) -> float:
    """MB/s of `processes` bare per-text encodes running at once, each over all texts: what this
    machine gives W busy processes (cores may share execution units or be shared with others).
    Each worker times only its encoding, not receiving the texts."""
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        seconds = pool.starmap(_per_text_seconds, [(model, texts)] * processes)
    return sum(megabytes / s for s in seconds)


def loader_rate(samples, batches: int = 50) -> float:
    """Samples/s of `samples.batch` over consecutive global batches of 64 at L = 512, one process."""
    start = time.perf_counter()
    for b in range(batches):
        samples.batch(np.arange(b * 64, (b + 1) * 64))
    return batches * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="text to repeat into the corpus")
    parser.add_argument("--mb", type=int, default=50, help="corpus size for the throughput runs (MB)")
    parser.add_argument("--large-mb", type=int, default=0, help="also measure peak RSS on a corpus this large")
    args = parser.parse_args()
    from deberta_ds.data.tokenizer import word_start_table
    work = Path(tempfile.mkdtemp(prefix="data_prep_bench_"))
    jsonl = make_jsonl(args.source, work / "corpus.jsonl", args.mb)
    texts = read_texts(jsonl)
    size_mb, text_mb = jsonl.stat().st_size / 2 ** 20, text_megabytes(texts)
    train_tokenizer(iter(texts), work / "tok", 8000, sample_sentences=200_000)
    ceiling, per_text = encode_rates(work / "tok" / "spm.model", texts, text_mb)
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cores; corpus {size_mb:.1f} MB JSONL, "
          f"{text_mb:.1f} MB of text "
          f"(repeated {args.source.name}); SentencePiece 8k unigram")
    print("| run | seconds | MB/s | peak RSS MB |")
    print("|---|---|---|---|")
    print(f"| bare spm encode, 1 process, batched (no I/O) | {text_mb / ceiling:.2f} | {ceiling:.1f} | - |")
    print(f"| bare spm encode, 1 process, one text per call | {text_mb / per_text:.2f} | {per_text:.1f} | - |")
    both = concurrent_encode_rate(work / "tok" / "spm.model", texts, text_mb)
    print(f"| bare spm encode, 2 processes at once, one text per call (aggregate) | - | {both:.1f} | - |")
    for workers in (1, 2):
        command = [sys.executable, "-m", "data_prep", "tokenize", "--input", str(jsonl), "--format", "jsonl",
                   "--output-prefix", str(work / f"w{workers}" / "s"), "--tokenizer", str(work / "tok"),
                   "--workers", str(workers), "--no-progress"]
        seconds, peak = run_measured(command)
        print(f"| data_prep tokenize, {workers} worker(s), whole command | {seconds:.2f} | {size_mb / seconds:.1f} | "
              f"{peak:.0f} |")
        # Ratios over the same document text the peers encode (not the JSONL file size).
        text_rate = text_mb / seconds
        print(f"|   ratio to {workers} x batched / per-text encode | | {text_rate / (workers * ceiling):.2f} / "
              f"{text_rate / (workers * per_text):.2f} | |")
    print(f"|   2 workers' ratio to 2 bare encodes at once | | {text_rate / both:.2f} | |")
    if args.large_mb:
        large = make_jsonl(args.source, work / "large.jsonl", args.large_mb)
        command = [sys.executable, "-m", "data_prep", "tokenize", "--input", str(large), "--format", "jsonl",
                   "--output-prefix", str(work / "large" / "s"), "--tokenizer", str(work / "tok"), "--workers", "2",
                   "--no-progress"]
        seconds, peak = run_measured(command)
        print(f"| data_prep tokenize, 2 workers, {large.stat().st_size / 2 ** 20:.0f} MB | {seconds:.1f} | "
              f"{large.stat().st_size / 2 ** 20 / seconds:.1f} | {peak:.0f} |")
        large_rate = text_megabytes(read_texts(large)) / seconds
        print(f"|   ratio to 2 x per-text encode / to 2 bare encodes at once | | "
              f"{large_rate / (2 * per_text):.2f} / {large_rate / both:.2f} | |")
    _, meta = load_tokenizer(work / "tok")
    processor = spm.SentencePieceProcessor(model_file=str(work / "tok" / "spm.model"))
    def samples(shards, masking=None, word_start=None, document_attention=False):
        return PretrainingSamples(TokenCorpus([shards]), 512, special_ids(meta), masking or MaskingConfig(), seed=0,
                                  word_start=word_start, document_attention=document_attention)

    rtd = loader_rate(samples(work / "w1"))
    mlm = loader_rate(samples(work / "w1", MaskingConfig(mode="mlm", whole_word=True),
                              word_start_table(processor, meta.model_vocab_size)), batches=10)
    # The two tokenize runs' shards as two sources 0.7 / 0.3, with document ids (#14's loader line).
    mixture = MixtureSamples(["w1", "w2"], [samples(work / f"w{w}", document_attention=True) for w in (1, 2)],
                             [0.7, 0.3])
    mixed = loader_rate(mixture)
    print(f"\nloader, L=512, 1 process: RTD masking {rtd:,.0f} samples/s; "
          f"MLM 80/10/10 whole-word n-gram {mlm:,.0f} samples/s; "
          f"RTD from a 2-source mixture with document ids {mixed:,.0f} samples/s")


if __name__ == "__main__":
    main()

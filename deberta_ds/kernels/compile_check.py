"""Compile the fused attention kernels for a GPU architecture ahead of time, with no GPU present.

Triton's interpreter (how the CPU tests run the kernels) executes the kernel as Python, so it
accepts code that the GPU compiler rejects and says nothing about registers or instruction counts.
This runs every kernel variant the host code launches (at the tiles `launch_tiles` picks for this
Triton) through Triton's real compiler down to a cubin (with the ptxas in Triton's wheel) and
reports per variant: registers, spill stack, shared memory, how many of its products are wgmma
(`warp_group_dot` in the TTGIR) and how many are not, and the static warp-instructions per score
element of its main loop per tile class (`sass.py`). Exit status 1 names the variants that do not
compile. `--triton X` runs it under another Triton, installed once into its own cached folder
(`triton_folder`), never into the environment; `--gated` compiles only the half-precision variants
gated under every compiler (plain and the training variants, at every head dim).

    python -m deberta_ds.kernels.compile_check --arch 90 [--json OUT.json]     # H100 / H200
    python -m deberta_ds.kernels.compile_check --arch 90 --triton 3.6.0 --gated
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")   # Triton's names for the tensor arguments
HEAD_DIMS = (32, 64, 128)
FEATURES = ("HAS_C2P", "HAS_P2C", "HAS_MASK", "DROPOUT", "DOCS")
INT32_POINTERS = {"MASK", "DOC"}
FP32_POINTERS = {"LSE", "DELTA", "DQ", "DK", "SATC", "SATP"}
INT64_POINTERS = {"SEED"}
TABLE_POINTERS = {"E", "F", "GC", "GP"}   # position tables and band buffers: in tables.table_dtype of the inputs
POINTERS = {"Q", "K", "V", "DO", "OUT", "DV"} | TABLE_POINTERS | INT32_POINTERS | FP32_POINTERS | INT64_POINTERS
PLAIN = {"HAS_C2P": True, "HAS_P2C": True, "HAS_MASK": False, "DROPOUT": False, "DOCS": False}
EVERYTHING = dict.fromkeys(FEATURES, True)
TRAINING = EVERYTHING | {"DOCS": False}   # pre-training: padding mask and attention dropout, both terms
GATED = ("plain", "all features", "without DOCS")   # the variants gated under every compiler (with documents:
# "all features"), half precision at both head dims


def _table_type(dtype: str) -> str:
    """Triton's name of the dtype the host code stores E, F and the band buffers in for `dtype` inputs."""
    import torch

    from deberta_ds.kernels.tables import table_dtype

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return names[table_dtype({name: dt for dt, name in names.items()}[dtype])]


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton argument types as the host code passes them (tensors, int32 scalars, fp32 scale)."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in POINTERS:
            types[name] = ("*i32" if name in INT32_POINTERS else "*i64" if name in INT64_POINTERS
                           else "*fp32" if name in FP32_POINTERS else "*" + _table_type(dtype)
                           if name in TABLE_POINTERS else "*" + dtype)
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    return types


def kernels(features: dict, head_dim: int):
    """(name, kernel, tile, tile constexprs) of the three kernels at the tiles they launch with here."""
    from deberta_ds.kernels import triton_attention as ta

    tiles = ta.launch_tiles(head_dim)
    dkdv = tiles.dkdv_for(features["DROPOUT"], features["DOCS"])
    return [("forward", ta._forward_kernel, tiles.forward, {"BM": tiles.forward.rows, "BN": tiles.forward.cols}),
            ("backward dQ", ta._backward_dq_kernel, tiles.dq, {"BM": tiles.dq.rows, "BN": tiles.dq.cols}),
            ("backward dK dV", ta._backward_dkdv_kernel, dkdv, {"BN": dkdv.rows, "BM": dkdv.cols})]


def settings(gated: bool = False) -> list[tuple[str, int, dict, str]]:
    """(dtype, head dim, features, label): every dtype and head dim with all features on, the plain
    variant (both terms; no mask, dropout or documents) at half precision for each head dim, the
    training variant (mask and dropout, no documents) at half precision for each head dim, each other
    feature off once (bf16, d = 64), and the plain variant with pointer loads (Tiles.tma off). gated: only
    the half-precision variants of GATED."""
    out = [(dtype, d, EVERYTHING, "all features") for dtype in DTYPES for d in HEAD_DIMS]
    out += [(dtype, d, PLAIN, "plain") for dtype in ("bf16", "fp16") for d in HEAD_DIMS]
    out += [(dtype, d, TRAINING, "without DOCS") for dtype in ("bf16", "fp16") for d in HEAD_DIMS]
    out += [("bf16", 64, EVERYTHING | {off: False}, f"without {off}") for off in FEATURES if off != "DOCS"]
    out += [("bf16", 64, PLAIN | {"HAS_C2P": False, "HAS_P2C": False}, "plain without terms")]
    out += [("bf16", 64, PLAIN | {"TMA": False}, "plain, pointer loads")]
    if gated:
        out = [s for s in out if s[0] in ("bf16", "fp16") and s[3] in GATED]
    return out


def static_cost(compiled, tile, stores: bool) -> dict:
    """Registers, spill, shared memory, products and per-class main-loop cost of one compiled kernel."""
    from deberta_ds.kernels.sass import cuobjdump, per_class

    usage = cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    fields = dict(part.split(":", 1) for line in usage.splitlines() if "REG:" in line for part in line.split())
    ttgir = compiled.asm["ttgir"]
    elements = tile.rows * tile.cols // tile.num_warps
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]), "shared_bytes":
            compiled.metadata.shared, "wgmma": len(re.findall(r"warp_group_dot ", ttgir)),
            "other_products": len(re.findall(r"\btt\.dot ", ttgir)),
            "per_element": per_class(cuobjdump(compiled.asm["cubin"], "-sass"), elements, stores)}


def compile_all(arch: int, gated: bool = False) -> tuple[list[dict], list[str]]:
    """Compile every variant (gated: those of GATED) for sm_{arch}: (reports, failures)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deberta_ds.kernels.triton_attention import launch_constants

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    reports, failures = [], []
    for dtype, head_dim, features, label in settings(gated):
        for name, kernel, tile, tile_constexprs in kernels(features, head_dim):
            constexprs = {"TMA": True} | features | tile_constexprs
            constexprs |= launch_constants(torch_dtypes[dtype], head_dim)
            signature = _signature(kernel, dtype, constexprs)
            # pointers 16-byte aligned, as a real launch specializes them
            attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                     if signature[arg].startswith("*")}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            title = f"{name:15s} {dtype} d={head_dim:<3d} {label}"
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
            except Exception as error:  # noqa: BLE001 - any compiler failure is reported, with its variant
                failures.append(f"{title}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
                print(f"{title}  FAILED", flush=True)
                continue
            cost = static_cost(compiled, tile, stores=name != "forward" and features["HAS_P2C" if "dK" in name
                                                                                    else "HAS_C2P"])
            reports.append({"kernel": name, "dtype": dtype, "head_dim": head_dim, "variant": label,
                            "tile": list(tile), "tma": constexprs["TMA"], "triton": triton.__version__, **cost})
            per_element = " ".join(f"{k} {v:.2f}" for k, v in cost["per_element"].items())
            print(f"{title}  registers {cost['registers']:>3d}  spill {cost['spill_bytes']:>4d} B  shared "
                  f"{cost['shared_bytes']} B  wgmma {cost['wgmma']} other {cost['other_products']}  per element: "
                  f"{per_element}", flush=True)
    return reports, failures


def cache_root() -> Path:
    """Where the compilers live: $DEBERTA_DS_CACHE, else ~/.cache/deberta_ds."""
    return Path(os.environ.get("DEBERTA_DS_CACHE") or Path.home() / ".cache" / "deberta_ds")


def triton_folder(version: str) -> Path:
    """A folder holding Triton `version` alone (`pip install --no-deps --target`), installed once per
    cache: under a lock (parallel runs wait for one install) and by renaming a finished staging
    folder, so an interrupted install leaves no half folder behind."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"triton-{version}"
    with open(root / f"triton-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".triton-{version}-", dir=root))
            try:
                pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                      "--disable-pip-version-check", "--target", str(staging), f"triton=={version}"],
                                     capture_output=True, text=True)
                if pip.returncode != 0:
                    raise RuntimeError(f"--triton {version}: pip could not install triton=={version} into {folder} "
                                       f"(offline? install it there with `pip install --no-deps --target {folder} "
                                       f"triton=={version}`):\n{pip.stderr.strip()[-2000:]}")
                staging.rename(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return folder


def run_under(version: str, argv: list[str]) -> int:
    """This command (argv without --triton) under Triton `version`, ahead of the installed one."""
    repository = Path(__file__).resolve().parents[2]
    path = [str(triton_folder(version)), str(repository), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.run([sys.executable, "-m", "deberta_ds.kernels.compile_check", *argv], env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.kernels.compile_check", description=__doc__,
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (80, 90, ...)")
    parser.add_argument("--json", help="also write the reports to this file (a list of objects)")
    parser.add_argument("--gated", action="store_true",
                        help="only the half-precision variants gated under every compiler")
    parser.add_argument("--triton", metavar="VERSION",
                        help="compile with this Triton, installed into its own folder under the cache (see "
                             "triton_folder) and put ahead of the installed one")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; the interpreter replaces the compiler. Unset it and rerun.",
              file=sys.stderr)
        return 2
    if args.triton:
        given = list(argv if argv is not None else sys.argv[1:])
        rest = [a for i, a in enumerate(given) if not (a == "--triton" or a.startswith("--triton=")
                                                       or (i and given[i - 1] == "--triton"))]
        return run_under(args.triton, rest)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    reports, failures = compile_all(args.arch, args.gated)
    if args.json:
        from deberta_ds.atomic_files import write_atomic

        write_atomic(args.json, json.dumps(reports, indent=1))
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the fused attention kernels for a GPU architecture ahead of time, with no GPU present.

Triton's interpreter (how the CPU tests run the kernels) executes the kernel as Python, so it
accepts code that the GPU compiler rejects (a non-constexpr global, for one) and says nothing
about registers. This runs every kernel variant the host code launches through Triton's real
compiler down to a cubin (with the ptxas in Triton's wheel) and reports registers, spill stack
and shared memory per variant. Exit status 1 names the variants that do not compile.

    python -m deberta_ds.kernels.compile_check --arch 90      # H100 / H200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")   # Triton's names for the tensor arguments
HEAD_DIMS = (32, 64, 128)
FEATURES = ("HAS_C2P", "HAS_P2C", "HAS_MASK", "DROPOUT", "DOCS")
INT32_POINTERS = {"slot_ptr", "slot_start_ptr", "mask_ptr", "doc_ptr"}
FP32_POINTERS = {"lse_ptr", "delta_ptr", "dkr_part_ptr", "dqr_part_ptr"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton argument types as the host code passes them (tensors, int32 scalars, fp32 scalars)."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*i32" if name in INT32_POINTERS else "*fp32" if name in FP32_POINTERS else "*" + dtype
        else:
            types[name] = "fp32" if name in ("scale", "dropout_p") else "i32"
    return types


def variants():
    """(label, kernel, dtype, constexprs): every dtype and head dim with all features on, and each
    feature off once (bf16, d = 64)."""
    import torch

    from deberta_ds.kernels import triton_attention as ta

    kernels = [("forward", ta._forward_kernel, {}), ("backward dK dV", ta._backward_kernel, {"KEY_SIDE": True}),
               ("backward dQ", ta._backward_kernel, {"KEY_SIDE": False})]
    settings = [(dtype, d, dict.fromkeys(FEATURES, True)) for dtype in DTYPES for d in HEAD_DIMS]
    settings += [("bf16", 64, dict.fromkeys(FEATURES, True) | {off: False}) for off in FEATURES]
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dtype, head_dim, features in settings:
        off = [name for name, on in features.items() if not on]
        for name, kernel, side in kernels:
            constexprs = features | side | ta.launch_constants(torch_dtypes[dtype], head_dim)
            label = f"{name:15s} {dtype} d={head_dim:<3d}" + (f" without {off[0]}" if off else "")
            yield label, kernel, dtype, constexprs


def resource_usage(cubin: bytes) -> str:
    """Registers, spill stack and shared memory from cuobjdump (bundled with Triton's NVIDIA backend)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", file.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(part.split(":", 1) for line in dump.splitlines() if "REG:" in line for part in line.split())
    return f"registers {fields['REG']:>3s}  spill stack {fields['STACK']:>4s} B"


def compile_all(arch: int) -> list[str]:
    """Compile every variant for sm_{arch}; returns the failures (one line each)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deberta_ds.kernels.triton_attention import DEFAULT_TILES

    failures = []
    for label, kernel, dtype, constexprs in variants():
        source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
        try:
            options = {"num_warps": DEFAULT_TILES.num_warps, "num_stages": DEFAULT_TILES.num_stages}
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:  # noqa: BLE001 - any compiler failure is reported, with its variant
            failures.append(f"{label}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
            print(f"{label}  FAILED", flush=True)
            continue
        print(f"{label}  {resource_usage(compiled.asm['cubin'])}  shared {compiled.metadata.shared} B", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.kernels.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (80, 90, ...)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; the interpreter replaces the compiler. Unset it and rerun.",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    failures = compile_all(args.arch)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

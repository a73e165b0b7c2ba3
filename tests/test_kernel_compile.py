"""The fused kernels compile for an H100 / H200 (sm_90) through Triton's real compiler and ptxas, with
no GPU, within static cost gates (the interpreter that runs the CPU parity tests accepts code the GPU
compiler rejects and says nothing about registers or instructions), under every Triton a user gets.

Compilers: the installed one (every variant), and each of TRITONS that is not installed (the
half-precision variants `compile_check.GATED` only), installed by compile_check into its own cached
folder under ~/.cache/deberta_ds (`$DEBERTA_DS_CACHE`), never into the environment. Compiled kernels
persist in Triton's cache (`$TRITON_CACHE_DIR`), so a rerun on an unchanged kernel is quick.

Gates, bf16 and fp16 with the tiles `launch_tiles` picks for that Triton (table blocks by tensor
descriptors; the pointer-load variant is a tuning candidate, reported only): 0 spill bytes in every
kernel and variant and every product a wgmma (`warp_group_dot`) at every head dim (HEAD_DIMS); at d = 64 the
warp-instructions per score element of each tile class's main-loop path within LIMITS: for the plain
variant (both terms; no mask, dropout or documents) and for the training variants (padding mask and
dropout, with and without documents), under every compiler.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import triton

from deberta_ds.kernels.compile_check import HEAD_DIMS
from tests.proc_helpers import run_bounded

# The GPU image's Triton, the ones torch 2.13 and 2.14 require, and the newest.
TRITONS = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")
PRODUCTS = {"forward": 2, "backward dQ": 3, "backward dK dV": 4}   # QK^T, PV / + dP, dQ / + dP, dV, dK
LIMITS = {
    "plain": {"forward": {"saturated": 1.0, "band": 1.4},
              "backward dQ": {"saturated": 0.8, "band": 0.8, "mixed": 1.5},
              "backward dK dV": {"saturated": 0.8, "band": 0.8, "mixed": 1.5}},
    "training": {"forward": {"saturated": 1.0, "band": 1.0, "mixed": 2.0},
                 "backward dQ": {"saturated": 1.0, "band": 1.0, "mixed": 2.0},
                 "backward dK dV": {"saturated": 1.2, "band": 1.2, "mixed": 2.0}},
}
GATE = {"plain": "plain", "without DOCS": "training", "all features": "training"}


def compile_reports(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run_bounded([sys.executable, "-m", "deberta_ds.kernels.compile_check", "--arch", "90", "--json",
                          str(tmp_path / "cost.json"), *args], timeout_s=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((tmp_path / "cost.json").read_text())


def assert_within_gates(reports: list[dict]):
    half = [r for r in reports if r["dtype"] in ("bf16", "fp16") and r["tma"]]
    assert {(r["variant"], r["dtype"], r["head_dim"]) for r in half if r["variant"] in GATE} == {
        (v, d, h) for v in GATE for d in ("bf16", "fp16") for h in HEAD_DIMS}
    over = []
    for report in half:   # every half-precision variant compiled (the installed Triton: each feature off too)
        assert report["spill_bytes"] == 0, report
        assert report["wgmma"] == PRODUCTS[report["kernel"]] and report["other_products"] == 0, report
        if report["head_dim"] == 64 and report["variant"] in GATE:
            limits = LIMITS[GATE[report["variant"]]][report["kernel"]]
            for tile_class, limit in limits.items():
                if report["per_element"][tile_class] > limit:
                    over.append((report["kernel"], report["dtype"], report["variant"], tile_class,
                                 report["per_element"][tile_class], limit))
    assert not over, over


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_within_the_static_cost_gates(tmp_path):
    from deberta_ds.kernels.compile_check import settings

    reports = compile_reports(tmp_path)
    assert len(reports) == 3 * len(settings())
    assert {r["triton"] for r in reports} == {triton.__version__}
    assert_within_gates(reports)


@pytest.mark.slow
@pytest.mark.parametrize("version", [v for v in TRITONS if v != triton.__version__])
def test_the_gated_variants_meet_the_gates_under_every_triton_users_get(version, tmp_path):
    reports = compile_reports(tmp_path, "--gated", "--triton", version)
    assert {r["triton"] for r in reports} == {version}
    assert len(reports) == 3 * 2 * 3 * len(HEAD_DIMS)   # three kernels, two dtypes, three variants, each head dim
    assert_within_gates(reports)


def test_a_compiler_is_installed_once_into_its_own_folder_and_a_failed_install_leaves_none(tmp_path, monkeypatch):
    """triton_folder: pip's --target output is renamed into place only when pip succeeds; a second call
    reuses the folder; a failing pip (offline) leaves no folder and says how to install it by hand."""
    import subprocess

    from deberta_ds.kernels import compile_check

    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        target = command[command.index("--target") + 1]
        if "triton==0.0.1" in command:
            (Path(target) / "half-written").write_text("")
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")
        (Path(target) / "triton").mkdir()
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("DEBERTA_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_check.subprocess, "run", pip)
    folder = compile_check.triton_folder("3.6.0")
    assert folder == tmp_path / "cache" / "triton-3.6.0" and (folder / "triton").is_dir()
    assert compile_check.triton_folder("3.6.0") == folder and len(calls) == 1
    with pytest.raises(RuntimeError, match=r"triton==0\.0\.1.*pip install --no-deps --target"):
        compile_check.triton_folder("0.0.1")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == ["triton-3.6.0"]

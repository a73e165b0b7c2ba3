"""Static cost of a compiled kernel without a GPU: its main loop's paths in SASS, per tile class.

cuobjdump (shipped in Triton's NVIDIA backend) disassembles the cubin. The main loop is the backward
branch spanning the most instructions (before the last EXIT: the TMA / mbarrier retry loops sit
after it). Every acyclic path from its head to the back edge is enumerated: conditional forward
branches inside the loop fork, branches that leave it count as not taken. A path's length over the
score elements one warp owns per tile (rows * cols / warps) is the figure the kernels are gated on
(warp-instructions per score element; a plain flash forward needs about 0.5).

Tile classes by what a path does with the tables: a saturated tile touches no table block (no TMA
load, no TMA store), a band or mixed tile loads blocks (and in the backward also stores dS): the
shortest such path is the band tile, the longest the mixed one. Paths that load without storing or
store without loading are infeasible combinations of the backward's two class tests and are left out.
A kernel without TMA (pointer loads, or no position terms) gets one figure: its longest path.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(!?U?P\w+,\s*)?(?:`\()?0x([0-9a-f]+)")  # BRA [P0,] 0x...
MAX_PATHS = 4096


def cuobjdump(cubin: bytes, *flags: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(tool), *flags, file.name], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_LINE.match, sass.splitlines()) if m]


def _target(text: str) -> int | None:
    match = _BRANCH.search(text)
    return int(match.group(2), 16) if match else None


def _conditional(text: str) -> bool:
    """A predicated branch (@P BRA) or one with a predicate operand (BRA P0, target)."""
    match = _BRANCH.search(text)
    return text.startswith("@") or bool(match and match.group(1))


def main_loop(ins: list[tuple[int, str]]) -> tuple[int, int]:
    """(head, back edge) of the longest loop before the last EXIT."""
    last_exit = max(address for address, text in ins if re.search(r"\bEXIT\b", text))
    loops = [(_target(text), address) for address, text in ins
             if address <= last_exit and _target(text) is not None and _target(text) < address]
    if not loops:
        raise ValueError("no loop in this kernel")
    return max(loops, key=lambda loop: loop[1] - loop[0])


def loop_paths(ins: list[tuple[int, str]]) -> list[list[str]]:
    """Every acyclic path (instruction texts) through one iteration of the main loop."""
    head, back = main_loop(ins)
    position = {address: n for n, (address, _) in enumerate(ins)}
    paths, pending = [], [(position[head], [])]
    while pending and len(paths) < MAX_PATHS:
        n, path = pending.pop()
        while True:
            address, text = ins[n]
            path = path + [text]
            if address == back:
                paths.append(path)
                break
            target = _target(text)
            if target is not None and head <= target <= back and target > address:
                if _conditional(text):                         # conditional: both ways
                    pending.append((position[target], path))
                else:
                    n = position[target]
                    continue
            elif target is not None and not (head <= target <= back) and not _conditional(text):
                break                                          # leaves the loop for good: not an iteration
            n += 1
    return paths


def per_class(sass: str, elements_per_warp: int, stores: bool) -> dict:
    """Warp-instructions per score element of the main loop's tile classes: saturated, the longest path
    without table blocks; band and mixed, the shortest and longest with them (`stores`: the backward's
    band tiles also block-store dS)."""
    classes: dict[str, list[int]] = {"saturated": [], "table": []}
    for path in loop_paths(instructions(sass)):
        loads = any("UTMALDG" in text for text in path)
        stored = any("UTMASTG" in text for text in path)
        if not loads and not stored:
            classes["saturated"].append(len(path))
        elif loads and (stored or not stores):
            classes["table"].append(len(path))
    if not classes["table"]:   # no TMA at all (pointer loads, or no tables): one figure, the longest path
        return {"longest path": max(classes["saturated"], default=0) / elements_per_warp}
    return {"saturated": max(classes["saturated"], default=0) / elements_per_warp,
            "band": min(classes["table"]) / elements_per_warp, "mixed": max(classes["table"]) / elements_per_warp}

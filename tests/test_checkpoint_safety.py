"""No checkpoint file can run code: a pickle that would create a file when unpickled is planted
in each file a resume, `convert to-hf` or the universal-checkpoint conversion loads; each refuses
the file by name and nothing runs. (A plain torch.load of the same file does run it: the test
can fail.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.proc_helpers import run_bounded
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


class _CreatesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _plant(path: Path, marker: Path) -> None:
    torch.save({"module": {"weight": torch.zeros(1)}, "payload": _CreatesAFile(marker)}, path)


def _rerecord(step: Path) -> None:
    """Record the planted file's hash in COMPLETE, as whoever replaced the file could: the
    weights-only loading must hold on its own."""
    from deberta_ds.checkpoint_reader import vouch

    vouch(step)


@pytest.mark.slow
def test_a_planted_pickle_runs_nowhere(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "run", train={"steps": 2, "zero_stage": 2})
    (tmp_path / "run.json").write_text(json.dumps(run))
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(tmp_path / "run.json")], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    planted_files = sorted(p.relative_to(step) for p in step.rglob("*.pt"))
    assert len(planted_files) >= 4 and not list(step.glob("rng_rank*.pt"))  # RNG states are safetensors now
    marker = tmp_path / "code_ran"
    _plant(tmp_path / "control.pt", marker)
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()  # the payload is live
    marker.unlink()
    for relative in planted_files:
        copy = tmp_path / f"copy_{relative.parent.name}_{relative.stem}"
        shutil.copytree(tmp_path / "run", copy)
        _plant(copy / "checkpoints" / "step_00000002" / relative, marker)
        _rerecord(copy / "checkpoints" / "step_00000002")
        config = tmp_path / f"{copy.name}.json"
        config.write_text(json.dumps(run | {"output_dir": str(copy), "train": run["train"] | {"steps": 3}}))
        resumed = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(config)], cwd=REPO)
        assert resumed.returncode == 1 and f"{relative.name}: refused to load" in resumed.stderr, \
            (relative, resumed.stderr[-2000:])
        exported = run_bounded([sys.executable, "-m", "deberta_ds.convert", "to-hf", "--checkpoint", str(copy),
                                "--out", str(tmp_path / "hf")], cwd=REPO)
        assert exported.returncode == 2 and "refused to load" in exported.stderr, (relative, exported.stderr[-2000:])
        assert not marker.exists(), relative
    universal = subprocess.run([sys.executable, "-m", "deberta_ds.safe_load",
                                "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(copy / "checkpoints" / "step_00000002" / relative.parent), "--output_folder",
                                str(tmp_path / "universal"), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert universal.returncode != 0 and "refused to load" in universal.stderr + universal.stdout
    assert not marker.exists()

"""README's main job end to end, shortened to a few steps (the full run is the same script)."""

import re
from pathlib import Path

import pytest

from tests.proc_helpers import run_bounded

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """Run from outside the clone with a relative output folder: everything lands there."""
    result = run_bounded(["bash", str(REPO / "launch_scripts" / "quickstart.sh"), "qs", "train.steps=4",
                          "train.eval_every=2", "train.save_every=2", "train.global_batch_size=8",
                          "train.micro_batch_size=4"], timeout_s=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(rf"== done in \d+m\d+s; outputs under {re.escape(str(tmp_path / 'qs'))}:\n  data/ ", result.stdout)
    assert re.search(r"== 3/4 pre-training .* \(at \d+m\d+s\)", result.stdout)
    assert "eval at step 4" in result.stdout + result.stderr
    assert "transformers loaded" in result.stdout and "TensorBoard logs" in result.stdout
    assert "most likely replaced" in result.stdout and "'The assert statement eats a condition" in result.stdout
    assert "fine-tuning the export on a sample of SST-2" in result.stdout or "skipping the fine-tuning demo" in \
        result.stdout
    assert "held-out evaluation at step 4" in result.stdout
    assert (tmp_path / "qs" / "hf_discriminator" / "model.safetensors").is_file()
    assert (tmp_path / "qs" / "hf_discriminator" / "tokenizer.json").is_file()  # AutoTokenizer gets ours
    assert list((tmp_path / "qs" / "run" / "tensorboard").glob("events.out.tfevents.*"))

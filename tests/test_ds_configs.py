"""The shipped DeepSpeed JSONs parse, are accepted by DeepSpeed's own config parser, and agree with the run config."""

import json

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from deberta_ds.resources import ds_config_file, ds_config_names
from deberta_ds.training.ds_config import build_ds_config, default_ds_config_name
from deberta_ds.training.run_config import load_run_config, run_config_from_dict

NAMES = ds_config_names()


def test_every_stage_and_precision_has_a_file():
    names = set(NAMES)
    for stage in range(4):
        for precision in ("fp32", "bf16", "fp16"):
            assert f"zero{stage}_{precision}" in names
    assert {"zero3_offload_bf16", "zero3_offload_fp16"} <= names


@pytest.mark.parametrize("name", NAMES)
def test_file_builds_into_a_config_deepspeed_accepts(name):
    raw = json.loads(ds_config_file(name).read_text())
    stage = raw["zero_optimization"]["stage"]
    precision = "bf16" if raw.get("bf16", {}).get("enabled") else "fp16" if raw.get("fp16", {}).get("enabled") \
        else "fp32"
    run = run_config_from_dict({"train": {"zero_stage": stage, "precision": precision,
                                          "offload": "offload" in name, "global_batch_size": 64,
                                          "micro_batch_size": 8}})
    assert default_ds_config_name(run) == name
    ds = build_ds_config(run, data_parallel_size=4, lr=1e-4, on_cpu=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 8, 2)
    parsed = DeepSpeedConfig(build_ds_config(run, data_parallel_size=1, lr=1e-4, on_cpu=True))  # a world of one here
    assert parsed.train_batch_size == 64 and parsed.gradient_accumulation_steps == 8
    assert parsed.zero_optimization_stage == stage


def test_conflicting_batch_size_in_json_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 128, "zero_optimization": {"stage": 1}}))
    run = run_config_from_dict({"train": {"zero_stage": 1, "precision": "fp32", "ds_config": str(bad),
                                          "global_batch_size": 64, "micro_batch_size": 8}})
    with pytest.raises(ValueError, match="train_batch_size = 128 disagrees"):
        build_ds_config(run, 4, 1e-4, True)


def test_shipped_run_configs_agree_with_their_ds_configs():
    quickstart = load_run_config("quickstart")  # a shipped recipe by name, as quickstart.sh passes it
    ds = build_ds_config(quickstart, data_parallel_size=2, lr=quickstart.optim.lr, on_cpu=True)
    assert ds["train_batch_size"] == quickstart.train.global_batch_size


@pytest.mark.parametrize("name", NAMES)
def test_zero_configs_overlap_communication_and_bf16_skips_the_per_parameter_overflow_check(name):
    """ZeRO-2/3 reduce gradients in buckets while the backward runs (overlap_comm); under bf16 the
    per-parameter inf/nan scan and its host read are off (README "DeepSpeed configuration" says why)."""
    raw = json.loads(ds_config_file(name).read_text())
    parsed = DeepSpeedConfig({**raw, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8})
    stage = raw["zero_optimization"]["stage"]
    if stage >= 2:
        assert parsed.zero_config.overlap_comm is True
    if raw.get("bf16", {}).get("enabled") and stage >= 1:
        assert parsed.bfloat16_config.check_grad_overflow is False

"""The DeepSpeed JSON for a run: a shipped file (`ds_configs/`) plus what the run config owns.

The run config is the one source of batch sizes, optimiser settings and clipping; the
JSON file contributes ZeRO and precision settings. A JSON file that sets a batch field
to a different value is an error, not a silent override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from deberta_ds.errors import UserError
from deberta_ds.resources import ds_config_file, ds_config_names
from deberta_ds.training.run_config import RunConfig

_PRECISION_KEYS = {"bf16": "bf16", "fp16": "fp16"}


def default_ds_config_name(config: RunConfig) -> str:
    offload = "_offload" if config.train.offload else ""
    return f"zero{config.train.zero_stage}{offload}_{config.train.precision}"


def load_ds_json(path) -> dict:
    """`path`: a file the user named (train.ds_config) or a shipped one (`resources.ds_config_file`)."""
    if not path.is_file():
        raise UserError(f"train.ds_config: {path} not found (give a DeepSpeed JSON file, or leave it unset for "
                         f"the shipped one of train.zero_stage and train.precision: {', '.join(ds_config_names())})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"train.ds_config: {path} is not valid JSON: {error}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def build_ds_config(config: RunConfig, data_parallel_size: int, lr: float, on_cpu: bool) -> dict:
    path = Path(config.train.ds_config) if config.train.ds_config else ds_config_file(default_ds_config_name(config))
    ds = _merge(load_ds_json(path), config.train.ds_overrides)
    accumulation = config.check_batch_geometry(data_parallel_size)
    owned = {"train_batch_size": config.train.global_batch_size,
             "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
             "gradient_accumulation_steps": accumulation,
             "gradient_clipping": config.optim.clip_grad}
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise UserError(f"{path}: {key} = {ds[key]} disagrees with the run config ({value}); "
                             "remove it from the DeepSpeed JSON, the run config owns it")
        ds[key] = value
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != config.train.zero_stage:
        raise UserError(f"{path}: zero_optimization.stage = {stage} but train.zero_stage = {config.train.zero_stage}")
    for precision, key in _PRECISION_KEYS.items():
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled != (config.train.precision == precision):
            raise UserError(f"{path}: {key}.enabled = {enabled} does not match train.precision = "
                             f"{config.train.precision}")
    # torch's AdamW: on the CPU, and on GPUs its fused CUDA kernel (the same update as DeepSpeed's
    # FusedAdam, without a JIT build of DeepSpeed's op on every fresh node). ZeRO-Offload keeps
    # DeepSpeed's CPU Adam, the one optimiser that steps CPU-resident states at speed.
    torch_adam = on_cpu or not config.train.offload
    params = {"lr": lr, "betas": list(config.optim.betas), "eps": config.optim.eps,
              "weight_decay": config.optim.weight_decay, "torch_adam": torch_adam}
    if torch_adam and not on_cpu:
        params["fused"] = True
    ds["optimizer"] = {"type": "AdamW", "params": params}
    return ds

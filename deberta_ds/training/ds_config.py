"""The DeepSpeed JSON for a run: a shipped file (`ds_configs/`) plus what the run config owns.

The run config is the one source of batch sizes, optimiser settings and clipping; the
JSON file contributes ZeRO and precision settings. A JSON file that sets a batch field
to a different value is an error, not a silent override.
"""

from __future__ import annotations

import copy
from pathlib import Path

from deberta_ds.config import parse_config_text, short_repr
from deberta_ds.errors import UserError, require
from deberta_ds.resources import ds_config_file, ds_config_names
from deberta_ds.training.run_config import RunConfig

_PRECISION_KEYS = {"bf16": "bf16", "fp16": "fp16"}

# DeepSpeed 0.19's top-level sections that a DeepSpeed JSON or train.ds_overrides may set (DeepSpeed
# itself ignores unknown keys: a misspelt one would silently do nothing). The batch sizes, clipping,
# optimizer and schedule belong to the run config; DeepSpeed's `checkpoint` section to the trainer.
DS_SECTIONS = {"zero_optimization": dict, "bf16": dict, "fp16": dict, "activation_checkpointing": dict,
               "flops_profiler": dict, "comms_logger": dict, "tensorboard": dict, "csv_monitor": dict,
               "wandb": dict, "aio": dict, "data_types": dict, "steps_per_print": int, "wall_clock_breakdown": bool,
               "memory_breakdown": bool, "dump_state": bool, "prescale_gradients": bool,
               "gradient_predivide_factor": (int, float), "communication_data_type": (str, type(None)),
               "zero_allow_untested_optimizer": bool, "zero_force_ds_cpu_optimizer": bool,
               "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
               "gradient_clipping": (int, float)}


def check_ds_sections(ds, where: str) -> None:
    """Known top-level sections of the right type; zero_optimization's fields checked by DeepSpeed's
    own model (it forbids unknown fields), as a UserError naming `where`."""
    require(isinstance(ds, dict), where, f"must be a JSON object of DeepSpeed sections, got {short_repr(ds)}")
    unknown = sorted(set(ds) - set(DS_SECTIONS))
    require(not unknown, where, f"unknown DeepSpeed section(s) {unknown}; known: {sorted(DS_SECTIONS)} (the "
                                "optimizer and schedule are set by the run config's optim section)")
    for key, value in ds.items():
        require(isinstance(value, DS_SECTIONS[key]) and not (isinstance(value, bool) and DS_SECTIONS[key] is int),
                f"{where}.{key}", f"{short_repr(value)} has the wrong type (DeepSpeed expects "
                                  f"{getattr(DS_SECTIONS[key], '__name__', 'a number or text')})")
    if "zero_optimization" in ds:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
        try:
            DeepSpeedZeroConfig(**ds["zero_optimization"])
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise UserError(f"{where}.zero_optimization: {problems}") from None


def default_ds_config_name(config: RunConfig) -> str:
    offload = "_offload" if config.train.offload else ""
    return f"zero{config.train.zero_stage}{offload}_{config.train.precision}"


def load_ds_json(path) -> dict:
    """`path`: a file the user named (train.ds_config) or a shipped one (`resources.ds_config_file`)."""
    if not path.is_file():
        raise UserError(f"train.ds_config: {path} not found (give a DeepSpeed JSON file, or leave it unset for "
                         f"the shipped one of train.zero_stage and train.precision: {', '.join(ds_config_names())})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"train.ds_config: {path} cannot be read ({error})") from None
    ds = parse_config_text(text, "json", f"train.ds_config: {path}")
    check_ds_sections(ds, f"train.ds_config: {path}")
    return ds


def _merge(base: dict, extra: dict) -> dict:
    """`extra` merged into a copy of `base`, section by section (a non-mapping replaces what it meets)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        mergeable = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if mergeable else copy.deepcopy(value)
    return out


def build_ds_config(config: RunConfig, data_parallel_size: int, lr: float, on_cpu: bool) -> dict:
    path = Path(config.train.ds_config) if config.train.ds_config else ds_config_file(default_ds_config_name(config))
    check_ds_sections(config.train.ds_overrides, "train.ds_overrides")
    ds = _merge(load_ds_json(path), config.train.ds_overrides)
    check_ds_sections(ds, f"train.ds_overrides merged into {path}")
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

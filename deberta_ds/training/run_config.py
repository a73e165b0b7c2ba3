"""One run configuration (YAML or JSON) for `python -m deberta_ds.train`, with dotted overrides.

    model: tiny                  # preset name
    model_overrides: {}          # any ModelConfig field
    rtd: {embedding_sharing: gdes, rtd_lambda: 50}
    data: {train: [shards/], valid: [valid/], tokenizer: tok/, max_length: 128,
           masking: {mode: rtd, probability: 0.15, whole_word: false, max_ngram: 3}}
    optim: {lr: 5e-4, warmup_steps: 10}
    train: {steps: 100, global_batch_size: 16, micro_batch_size: 8, zero_stage: 2}
    output_dir: runs/quickstart

Overrides on the command line: `train.steps=10 optim.lr=1e-3` (values parsed as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deberta_ds.config import PRESETS, ModelConfig, RTDObjective, from_dict, parse_config_text, short_repr
from deberta_ds.data.dataset import MaskingConfig
from deberta_ds.errors import UserError, require
from deberta_ds.resources import config_path


@dataclass
class DataSource:
    """One entry of a weighted mixture in `data.train`."""

    path: str                            # a shard directory, prefix or glob
    name: str = ""                       # default: the path's last part
    weight: float | None = None          # share of the samples (normalised over the sources)


@dataclass
class DataSection:
    # Plain paths (one corpus, each shard weighted by its tokens) or mixture entries
    # {name, path, weight} (see deberta_ds.data.mixture).
    train: list[str | dict | DataSource] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    tokenizer: str = ""
    max_length: int = 512
    cross_documents: bool = True
    # Packed samples: each token attends only inside its own document (the batch carries
    # document_ids; the EMD's absolute positions restart per document). Needs cross_documents.
    document_attention: bool = False
    masking: MaskingConfig = field(default_factory=MaskingConfig)   # {mode, probability, whole_word, max_ngram}
    seed: int = 1234
    allow_incomplete_shards: bool = False   # accept shards of a tokenize job that did not finish (warns)

    def __post_init__(self):
        require(self.max_length >= 3, "data.max_length", "must be at least 3 ([CLS] x [SEP])")
        check_seed(self.seed, "data.seed")
        require(self.cross_documents or not self.document_attention, "data.document_attention",
                "needs data.cross_documents: true (without packing every sample holds one document)")
        self.train = [_source(entry, f"data.train[{i}]") for i, entry in enumerate(self.train)]
        weighted = [source.weight is not None for source in self.train]
        require(all(weighted) or not any(weighted), "data.train",
                "give every entry a weight ({name, path, weight}) or none (plain paths)")
        require(not any(weighted) or sum(source.weight for source in self.train) > 0, "data.train",
                "the mixture weights sum to 0")
        names = [source.name for source in self.train]
        require(not self.is_mixture or len(set(names)) == len(names), "data.train",
                f"source names repeat: {names}; give each a name")

    @property
    def is_mixture(self) -> bool:
        return any(source.weight is not None for source in self.train)


@dataclass
class OptimSection:
    name: str = "adamw"                 # adamw (DeepSpeed FusedAdam on GPU, torch AdamW on CPU) | lamb (apex)
    lr: float = 1e-4
    generator_lr: float | None = None   # decoupled mode: the generator's own rate (default: lr)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    decay_embedding_delta: bool = True  # false: exempt GDES's E_delta from weight decay (the published code decays it)
    warmup_steps: int = 10000
    schedule: str = "linear"            # linear | cosine decay to min_lr_ratio * lr after warmup
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        require(len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas), "optim.betas",
                f"{list(self.betas)} must be two numbers in [0, 1) (Adam's beta1, beta2), e.g. [0.9, 0.999]")
        require(self.name in ("adamw", "lamb"), "optim.name", f"{self.name!r} is not adamw or lamb")
        require(self.schedule in ("linear", "cosine"), "optim.schedule", f"{self.schedule!r} is not linear or cosine")
        for name in ("lr", "generator_lr"):
            value = getattr(self, name)
            require(value is None or 0 < value <= 1, f"optim.{name}",
                    f"{value} is not a learning rate in (0, 1] (Adam's are about 1e-4 to 1e-3)")
        require(0 < self.eps < 1, "optim.eps", f"{self.eps} must be in (0, 1) (Adam's epsilon, e.g. 1e-6)")
        require(0 <= self.weight_decay < math.inf, "optim.weight_decay", f"{self.weight_decay} must be finite and >= 0")
        require(0 <= self.clip_grad < math.inf, "optim.clip_grad",
                f"{self.clip_grad} must be finite and >= 0 (the gradient-norm bound; 0: no clipping)")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio",
                f"{self.min_lr_ratio} must be in [0, 1] (the final rate as a share of optim.lr)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 8
    mode: str = "decoupled"             # decoupled: two engines/optimizers; joint: one step on mlm + lambda*rtd
    precision: str = "bf16"             # fp32 | bf16 | fp16
    zero_stage: int = 2
    offload: bool = False               # ZeRO-3 optimizer + parameter CPU offload
    ds_config: str | None = None        # default: the shipped zero{stage}[_offload]_{precision}.json
    ds_overrides: dict = field(default_factory=dict)  # merged into the DeepSpeed JSON (e.g. zero bucket sizes)
    tp: int = 1
    collective_timeout_s: int = 1800    # a collective waiting this long for a peer fails the run (lost node)
    activation_checkpointing: str = "none"   # layers: recompute every encoder layer in the backward
    compile: bool | None = None         # torch.compile each encoder layer; None: on for CUDA (ZeRO 0-2)
    log_every: int = 10                 # log steps: step 1, every log_every, the last (means since the previous)
    eval_every: int = 0                 # 0: evaluate only at the end
    eval_batches: int = 4               # held-out batches per evaluation (at least 1)
    save_every: int = 0                 # 0: save only at the end and on SIGTERM
    keep_last: int = 3                  # complete checkpoints kept (older ones are pruned)
    exit_after_steps: int | None = None   # stop with a checkpoint after this many steps of one invocation
    max_nonfinite_steps: int = 5        # abort after this many non-finite losses in a row
    inject_loss_scale_at_step: int | None = None   # testing aid: multiply the loss by 1e30 at this step
    inject_nan_from_step: int | None = None        # testing aid: NaN losses from this step on

    def __post_init__(self):
        require(self.mode in ("decoupled", "joint"), "train.mode", f"{self.mode!r} is not decoupled or joint")
        require(self.precision in ("fp32", "bf16", "fp16"), "train.precision",
                 f"{self.precision!r} is not fp32, bf16 or fp16")
        require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage",
                 f"unknown ZeRO stage {self.zero_stage}; use 0, 1, 2 or 3")
        for name in ("steps", "global_batch_size", "micro_batch_size", "eval_batches", "keep_last",
                     "collective_timeout_s"):
            require(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0 (0: only at the end), got "
                                                                f"{getattr(self, name)}")
        require(self.tp >= 1, "train.tp", f"must be >= 1, got {self.tp}")
        require(self.exit_after_steps is None or self.exit_after_steps >= 1, "train.exit_after_steps",
                f"must be >= 1 (or unset: no early exit), got {self.exit_after_steps}")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
                f"must be >= 1 (non-finite steps in a row that abort the run), got {self.max_nonfinite_steps}")
        require(self.activation_checkpointing in ("none", "layers"), "train.activation_checkpointing",
                 f"{self.activation_checkpointing!r} is not none or layers")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(not self.offload or self.zero_stage == 3, "train.offload", "CPU offload needs zero_stage 3")
        require(not (self.compile and self.zero_stage == 3), "train.compile",
                 "is not supported with zero_stage 3 (its parameter-gathering hooks would run inside the "
                 "compiled layers); use zero_stage <= 2 or train.compile: false")

    def compiles(self, device: torch.device) -> bool:
        """Whether encoder layers run under torch.compile: as asked, else on CUDA below ZeRO-3."""
        return self.compile if self.compile is not None else device.type == "cuda" and self.zero_stage < 3


@dataclass
class DownstreamSection:
    """eval.downstream: a short fine-tuning suite (`python -m deberta_ds.evaluate`, one seed) on
    the checkpoint of every save at a multiple of `every` steps, in the background on rank 0;
    scores to TensorBoard as downstream/TASK/METRIC (deberta_ds.downstream.in_training)."""

    every: int = 0                      # 0: off
    tasks: str = ""                     # deberta_ds.evaluate --tasks, e.g. glue/rte,glue/mrpc
    data_dir: str = ""                  # --data-dir
    arguments: list[str] = field(default_factory=list)  # further flags, e.g. [--epochs, "1"]

    def __post_init__(self):
        require(self.every >= 0, "eval.downstream.every", f"must be >= 0 (0: off), got {self.every}")
        if self.every:
            require(bool(self.tasks), "eval.downstream.tasks", "name the tasks (e.g. glue/rte,glue/mrpc)")
            require(Path(self.data_dir).is_dir(), "eval.downstream.data_dir",
                    f"{self.data_dir!r} is not a folder (the tasks' data, see python -m deberta_ds.evaluate --help)")


@dataclass
class EvalSection:
    downstream: DownstreamSection = field(default_factory=DownstreamSection)


@dataclass
class RunConfig:
    model: str = "base"
    model_overrides: dict = field(default_factory=dict)
    rtd: RTDObjective = field(default_factory=RTDObjective)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str = "runs/deberta"
    seed: int = 42
    # Continued pre-training: start from a deberta_ds checkpoint (native, a run's output_dir, or
    # split-tp shards) or an HF discriminator directory (+ init_generator_from, an HF generator).
    init_from: str | None = None
    init_generator_from: str | None = None
    # Phases: [{until_step: N, data.train: [...], data.max_length: L, data.masking.probability: p}, ...]
    # change the data section at step boundaries (the last until_step is train.steps or beyond).
    phases: list[dict] = field(default_factory=list)

    def __post_init__(self):
        check_seed(self.seed, "seed")
        require(self.model in PRESETS, "model", f"unknown preset {self.model!r}; choose one of {sorted(PRESETS)}")
        try:
            from_dict(ModelConfig, PRESETS[self.model] | self.model_overrides, "model_overrides")  # names, types
        except UserError as error:  # ModelConfig names its own fields: say where they are set
            raise UserError(str(error) if str(error).startswith("model_overrides") else f"model_overrides.{error}") \
                from None
        self.phase_plan()  # validated now, before anything is built

    def phase_plan(self) -> list[tuple[int, DataSection]]:
        """(first step, data section) of every phase in order; one phase without `phases`."""
        if not self.phases:
            return [(0, self.data)]
        plan, start = [], 0
        base = json.loads(json.dumps(dataclasses.asdict(self.data)))
        for i, phase in enumerate(self.phases):
            where = f"phases[{i}]"
            require(isinstance(phase, dict) and type(phase.get("until_step")) is int, where,
                    "needs until_step (an integer, not true/false) and data.* fields")
            until = phase["until_step"]
            require(until > start, f"{where}.until_step", f"{until} must be greater than the previous phase's end "
                                                          f"({start})")
            data = copy.deepcopy(base)
            for dotted, value in phase.items():
                if dotted == "until_step":
                    continue
                require(dotted.startswith("data."), f"{where}.{dotted}", "phases change data.* fields only")
                node, *parents = data, *dotted.split(".")[1:-1]
                for part in parents:
                    node = node.setdefault(part, {})
                node[dotted.split(".")[-1]] = value
            try:
                plan.append((start, from_dict(DataSection, data, f"{where}.data")))
            except UserError as error:
                raise UserError(f"{where}: {error}") from None
            start = until
        require(start >= self.train.steps, f"phases[{len(self.phases) - 1}].until_step",
                f"{start} ends before train.steps={self.train.steps}; the last phase must reach it")
        return plan

    def check_batch_geometry(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps; a clear error when the batch sizes do not fit the world."""
        per_step = self.train.micro_batch_size * data_parallel_size
        require(self.train.global_batch_size % per_step == 0, "train.global_batch_size",
                 f"{self.train.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
                 f"= {self.train.micro_batch_size} x {data_parallel_size}")
        return self.train.global_batch_size // per_step


def check_seed(seed: int, field_name: str) -> None:
    require(0 <= seed < 2 ** 63, field_name, f"{seed} must be in [0, 2**63) (the random generators take 64 bits)")


def _source(entry, where: str) -> DataSource:
    if isinstance(entry, DataSource):
        return entry
    source = from_dict(DataSource, {"path": entry} if isinstance(entry, str) else entry, where)
    require(source.weight is None or 0 <= source.weight < math.inf, f"{where}.weight",
            f"must be a finite number >= 0, got {source.weight}")
    source.name = source.name or Path(source.path.rstrip("/")).name
    return source


def run_config_from_dict(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.field=value` strings (value parsed as YAML) applied to a nested dict."""
    for override in overrides:
        require("=" in override, "override", f"{override!r} is not of the form section.field=value")
        dotted, raw = override.split("=", 1)
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), dotted, "is not a section")
        node[leaf] = _parse_value(override, raw)
    return data


def _parse_value(override: str, raw: str):
    """YAML (bounded), except that '3e-3' is a number (YAML 1.1 reads exponents without a dot as strings)."""
    value = parse_config_text(raw, "yaml", f"override {short_repr(override)}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = {}
    if path is not None:
        path = config_path(path)  # a file, or a shipped recipe by name
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--config {path}: cannot be read ({error})") from None
        data = parse_config_text(text, "json" if path.suffix == ".json" else "yaml", f"--config {path}")
        data = {} if data is None else data
        require(isinstance(data, dict), "--config", f"{path}: the top level must be a mapping of sections "
                                                    f"(model:, data:, train:, ...), got a {type(data).__name__}")
    return run_config_from_dict(apply_overrides(data, list(overrides)))


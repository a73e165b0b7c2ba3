"""DeepSpeed engines for the RTD pair and one optimisation step in either mode.

joint:     one engine over the whole pair, one backward of mlm + lambda * rtd, one step.
decoupled: two engines (generator, discriminator), each with its own optimiser and loss
           scale: the generator steps on the MLM loss, the discriminator on rtd_lambda x the
           RTD loss of the sampled batch (as the published code does), so both modes follow
           the gradients of the same objective. Every engine sees exactly one backward per micro-batch (ZeRO-1/2
           keep only the last of several backward calls before a step).

Under ZeRO-3 the generator's embedding E_G is partitioned outside the generator's own
forward. The tied LM head and the joint engine's discriminator read it through
`register_external_parameter`; the decoupled discriminator engine reads a copy gathered with
`GatheredParameters`. ES across two engines: the discriminator's gradient w.r.t. that copy
is added to the generator's loss as sum(E_G * grad), so E_G receives both gradients and is
stepped once, by its own optimiser; the samples then come from a no-grad generator pass.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import deepspeed
import torch
from torch import nn

from deberta_ds.data.random import hash64
from deberta_ds.errors import UserError
from deberta_ds.model.rtd import (
    DiscriminatorOutput,
    GeneratorOutput,
    MaskedPositions,
    ReplacedTokenDetection,
    replaced_ratio,
)
from deberta_ds.training.ds_config import build_ds_config
from deberta_ds.training.run_config import RunConfig


def sampling_rng(seed: int, first_global_index: int, device: torch.device) -> torch.Generator:
    """Generator on the model's device for the RTD samples of a micro-batch: a function of the
    data, not of the rank or the stage (CPU and CUDA generators draw different, equally valid
    samples from the same seed)."""
    return torch.Generator(device=device).manual_seed(int(hash64(seed, first_global_index)) & ((1 << 63) - 1))


def loss_scale(engine) -> float:
    """The dynamic fp16 loss scale (ZeRO optimisers call it cur_scale, FP16_Optimizer loss_scale)."""
    optimizer = engine.optimizer
    return float(optimizer.cur_scale if hasattr(optimizer, "cur_scale") else optimizer.loss_scale)


def parameter_groups(module: nn.Module, weight_decay: float, decay_embedding_delta: bool = True) -> list[dict]:
    """AdamW groups: no decay for biases and LayerNorm weights. The GDES delta E_delta is decayed
    like every other weight, as in the published DeBERTa code (it keeps E_D near E_G), unless
    decay_embedding_delta is off."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = ".norm." in f".{name}" or "_norm." in name
        exempt_delta = name.endswith("embedding_delta") and not decay_embedding_delta
        (no_decay if param.dim() < 2 or is_norm or exempt_delta else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(config: RunConfig):
    """Linear warmup, then linear or cosine decay to min_lr_ratio at train.steps."""
    warmup, total, floor = config.optim.warmup_steps, config.train.steps, config.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if config.optim.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return factor


def _lamb(groups: list[dict], config: RunConfig, lr: float):
    """apex's FusedLAMB (the NGC image ships apex); a clear error where apex is missing."""
    try:
        from apex.optimizers import FusedLAMB
    except ImportError:
        raise UserError("optim.name=lamb needs apex (pip install apex, or use the Docker image); "
                         "use optim.name=adamw otherwise") from None
    return FusedLAMB(groups, lr=lr, betas=config.optim.betas, eps=config.optim.eps,
                     weight_decay=config.optim.weight_decay)


def _initialize(module, config: RunConfig, lr: float, dp_size: int, on_cpu: bool, mpu=None, load_universal=False):
    ds_config = build_ds_config(config, dp_size, lr, on_cpu)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    groups = parameter_groups(module, config.optim.weight_decay, config.optim.decay_embedding_delta)
    optimizer = None
    if config.optim.name == "lamb":
        optimizer = _lamb(groups, config, lr)
        del ds_config["optimizer"]
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=groups, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)), mpu=mpu)
    return engine


def register_external_parameters(model: ReplacedTokenDetection, joint: bool) -> None:
    """ZeRO-3: parameters read outside the forward of the module that owns them."""
    generator_embedding = model.generator.word_embeddings.weight
    deepspeed.zero.register_external_parameter(model.generator, generator_embedding)      # tied LM head
    deepspeed.zero.register_external_parameter(model.generator, model.generator.encoder.rel_embeddings)  # EMD
    if joint and model.config.embedding_sharing != "nes":
        deepspeed.zero.register_external_parameter(model.discriminator, generator_embedding)


def _global_grad_norm(module: nn.Module, device: torch.device, tp) -> torch.Tensor:
    """L2 norm of all gradients; TP-split parameters summed over the TP group `tp`, replicated
    ones once. One foreach norm per group (no per-parameter loop of kernels); a 0-d tensor on
    `device`: read on the host only when it is logged."""
    from deberta_ds.parallel.mappings import all_reduce_no_grad

    grads = [p for p in module.parameters() if p.grad is not None]
    split = [p.grad.detach() for p in grads if getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad.detach() for p in grads if not getattr(p, "tensor_model_parallel", False)]

    def squares(tensors) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)).square().sum()

    split_total = all_reduce_no_grad(squares(split).reshape(1), tp)[0]
    return (split_total + squares(replicated)).sqrt()


def batch_masked_positions(batch: dict) -> MaskedPositions | None:
    """The prefetcher's padded masked positions (see prefetch.to_tensors), None in a batch without."""
    return MaskedPositions(batch["masked_index"], batch["masked_labels"]) if "masked_index" in batch else None


@dataclass
class StepResult:
    generator: GeneratorOutput
    discriminator: DiscriminatorOutput
    corrupted: torch.Tensor
    replaced_ratio: torch.Tensor
    loss: torch.Tensor              # the joint objective (also reported in decoupled mode)
    finite: bool                    # every rank's losses were finite (training steps only)
    stop: bool                      # some rank asked to stop (SIGTERM), agreed in the same reduction


class RTDEngines:
    """Owns the engine(s) and runs one micro-batch of training or evaluation.

    `device` (DeepSpeed's choice for this rank: cuda:LOCAL_RANK, or cpu) is where batches, RNG
    and every tensor the loop creates for the model must live; the trainer reads it here.
    """

    def __init__(self, model: ReplacedTokenDetection, config: RunConfig, dp_size: int, on_cpu: bool, mpu=None,
                 load_universal: bool = False):
        """dp_size: data-parallel replicas (world / TP); mpu: the TP x DP groups when TP > 1."""
        self.model, self.config = model, config
        self.joint = config.train.mode == "joint"
        self.zero3 = config.train.zero_stage == 3
        if self.zero3:
            register_external_parameters(model, self.joint)
        self._norms: dict[str, float] = {}

        def build(module, lr):
            return _initialize(module, config, lr, dp_size, on_cpu, mpu, load_universal)

        if self.joint:
            self.engines = {"joint": build(model, self.base_lr("joint"))}
        else:
            self.engines = {"generator": build(model.generator, self.base_lr("generator")),
                            "discriminator": build(model.discriminator, self.base_lr("discriminator"))}
        self.device = next(iter(self.engines.values())).device

    def base_lr(self, name: str) -> float:
        """The run config's peak learning rate of one engine."""
        optim = self.config.optim
        return (optim.generator_lr or optim.lr) if name == "generator" else optim.lr

    def set_learning_rates(self) -> None:
        """After loading a checkpoint: the run config's peak rates and schedule at the restored step
        (the loaded scheduler keeps the checkpoint's base rates, and the universal loader leaves the
        groups' rates at 0), so a changed optim.lr applies from the resume step."""
        for name, engine in self.engines.items():
            scheduler = engine.lr_scheduler
            scheduler.base_lrs = [self.base_lr(name)] * len(scheduler.base_lrs)
            rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs,
                                                                                   scheduler.lr_lambdas)]
            for group, lr in zip(engine.optimizer.param_groups, rates):
                group["lr"] = lr
            scheduler._last_lr = rates

    def grad_norm(self, name: str) -> float | None:
        """The global gradient norm of the engine's last step (DeepSpeed's, else our own)."""
        norm = self.engines[name].get_global_grad_norm()
        if norm is None:
            norm = self._norms.get(name)
        return None if norm is None else float(norm)

    def _step(self, name: str) -> None:
        """engine.step(), recording the gradient norm where DeepSpeed keeps none (no ZeRO, fp32)."""
        engine = self.engines[name]
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            self._norms[name] = _global_grad_norm(engine.module, self.device, self.model.tp)
        engine.step()

    def train(self, mode: bool = True) -> None:
        for engine in self.engines.values():
            engine.train(mode)

    def _gathered_generator_embedding(self) -> torch.Tensor:
        weight = self.model.generator.word_embeddings.weight
        context = deepspeed.zero.GatheredParameters([weight]) if self.zero3 else nullcontext()
        with context:
            return weight.detach().clone()

    def _agree(self, losses, stop_requested: bool) -> tuple[bool, bool]:
        """(every rank's losses are finite, some rank asked to stop): one small all-reduce over
        the whole world (TP and DP ranks decide together) and one host synchronisation."""
        finite = torch.stack([torch.isfinite(loss).all() for loss in losses]).all()
        flags = torch.stack([finite.float(), torch.full((), float(not stop_requested), device=self.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        all_finite, none_stopping = flags.tolist()
        return all_finite == 1.0, none_stopping == 0.0

    def micro_step(self, batch: dict, rng: torch.Generator, loss_multiplier: float = 1.0,
                   train: bool = True, stop_requested: bool = False) -> StepResult:
        """Forward (and, when train, backward and step) of one micro-batch on `self.device`.
        Training agrees once per micro-batch, before any backward, whether every rank's losses
        are finite (if not, no rank runs a backward; the caller counts and aborts) and whether
        any rank asked to stop. Evaluation synchronises nothing."""
        context = nullcontext() if train else torch.no_grad()
        with context:
            if self.joint:
                return self._joint(batch, rng, loss_multiplier, train, stop_requested)
            return self._decoupled(batch, rng, loss_multiplier, train, stop_requested)

    def _joint(self, batch, rng, loss_multiplier, train, stop_requested) -> StepResult:
        engine = self.engines["joint"]
        out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], rng=rng,
                     document_ids=batch.get("document_ids"), masked=batch_masked_positions(batch))
        loss = out.loss * loss_multiplier
        finite, stop = self._agree([loss], stop_requested) if train else (True, False)
        if train and finite:
            engine.backward(loss)
            self._step("joint")
        return StepResult(out.generator, out.discriminator, out.corrupted_ids, out.replaced_ratio, out.loss, finite,
                          stop)

    def _decoupled(self, batch, rng, loss_multiplier, train, stop_requested) -> StepResult:
        generator, discriminator = self.engines["generator"], self.engines["discriminator"]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        documents = batch.get("document_ids")                 # [B, L] when data.document_attention is on
        masked = batch_masked_positions(batch)
        es = self.model.config.embedding_sharing == "es" and train
        # ES: the samples come from a no-grad pass; the generator's graph is built after the
        # discriminator's backward, when the RTD gradient w.r.t. E_G is known.
        with torch.no_grad() if es else nullcontext():
            gen_out = generator(ids, mask, labels, document_ids=documents, masked=masked)
        corrupted, replaced = self.model.corrupt(ids, labels, gen_out.logits, rng, masked)
        embedding = self._gathered_generator_embedding().requires_grad_(es)
        disc_out = discriminator(corrupted, mask, replaced, embedding, documents)
        # lambda scales what the discriminator steps on: with clipping and Adam's eps it is not a
        # no-op, and under ES it sets the weight of the RTD gradient that reaches E_G.
        disc_loss = self.model.weighted_rtd(disc_out.loss) * loss_multiplier
        # Under ES the generator objective checked is the sampling pass's: the pass with a graph
        # reads the same weights and batch (only its dropout masks differ).
        finite, stop = (self._agree([disc_loss, gen_out.objective * loss_multiplier], stop_requested) if train
                        else (True, False))
        if train and finite:
            if es:
                discriminator.backward(disc_loss)
                gen_out = generator(ids, mask, labels, embedding_gradient=embedding.grad, document_ids=documents,
                                    masked=masked)
            generator.backward(gen_out.objective * loss_multiplier)
            self._step("generator")
            if not es:
                discriminator.backward(disc_loss)
            self._step("discriminator")
        return StepResult(gen_out, disc_out, corrupted, replaced_ratio(labels, replaced),
                          self.model.objective(gen_out, disc_out), finite, stop)

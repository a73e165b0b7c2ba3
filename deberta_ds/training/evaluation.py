"""Held-out evaluation: MLM loss/accuracy and RTD loss/accuracy/AUC on fixed batches, each rank
its data-parallel slice, the scores gathered over every rank for one AUC."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from deberta_ds.training.engines import RTDEngines, sampling_rng
from deberta_ds.training.metrics import roc_auc
from deberta_ds.training.prefetch import to_device, to_tensors
from deberta_ds.training.run_config import RunConfig


@torch.no_grad()
def evaluate(engines: RTDEngines, samples, config: RunConfig, dp_rank: int, dp_size: int) -> dict:
    """The eval/ metrics of config.train.eval_batches global batches of `samples` (the same ones
    at every evaluation); every rank must call it."""
    engines.train(False)
    device, train = engines.device, config.train
    sums, scores, labels = torch.zeros(5, device=device), [], []
    local = train.global_batch_size // dp_size
    for b in range(train.eval_batches):
        start = b * train.global_batch_size + dp_rank * local
        batch = to_device(to_tensors(samples.batch(np.arange(start, start + local))), device)
        result = engines.micro_step(batch, sampling_rng(config.seed + 1, start, device), train=False)
        real = batch["attention_mask"].bool()
        sums += torch.stack([result.generator.loss, result.generator.accuracy, result.discriminator.loss,
                             result.discriminator.accuracy, torch.ones((), device=device)]).float()
        scores.append(result.discriminator.logits.float()[real])
        labels.append(result.discriminator.replaced[real])
    engines.train(True)
    local_results = (sums.double().cpu().numpy(), torch.cat(scores).cpu().numpy(), torch.cat(labels).cpu().numpy())
    gathered = [None] * dist.get_world_size()  # TP ranks repeat their replica's values: means are unchanged
    dist.all_gather_object(gathered, local_results)
    total = sum(g[0] for g in gathered)
    all_labels = np.concatenate([g[2] for g in gathered])
    return {"eval/mlm_loss": total[0] / total[4], "eval/mlm_accuracy": total[1] / total[4],
            "eval/rtd_loss": total[2] / total[4], "eval/rtd_accuracy": total[3] / total[4],
            "eval/rtd_auc": roc_auc(np.concatenate([g[1] for g in gathered]), all_labels),
            "eval/all_original_baseline": 1.0 - float(all_labels.mean())}

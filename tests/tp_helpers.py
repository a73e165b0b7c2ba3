"""Functions run inside real TP processes (see tests/test_tensor_parallel.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deberta_ds.config import rtd_config_from_dict
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.parallel.random import seed_streams
from deberta_ds.parallel.state import TensorParallel, initialize
from deberta_ds.parallel.state_dict_split import merge_states, partition_plan, split_state


def gather_full(tensors: dict, plan: dict, vocab_size: int, tp: TensorParallel) -> dict:
    """Full (TP = 1) tensors from this rank's shards: all-gather over the TP group, then merge."""
    shards = [dict() for _ in range(tp.size)]
    for name, tensor in tensors.items():
        parts = [torch.empty_like(tensor) for _ in range(tp.size)]
        dist.all_gather(parts, tensor.contiguous(), group=tp.group)
        for shard, part in zip(shards, parts):
            shard[name] = part
    return merge_states(shards, plan, vocab_size)


def tp_forward_backward(tp: int, config_dict: dict, full_state: dict, batch: dict, seed: int) -> dict:
    parallel = initialize(tp)
    group = parallel.tp
    config = rtd_config_from_dict(config_dict)
    model = ReplacedTokenDetection(config, group)
    plan, vocab = partition_plan(model), config.discriminator.vocab_size
    model.load_state_dict(split_state(full_state, plan, vocab, tp, group.rank))
    seed_streams(seed, parallel)  # attention forks the TP stream (with dropout off nothing depends on the seed)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    documents = batch.get("document_ids")
    out = model(ids, mask, labels, rng=torch.Generator().manual_seed(seed), document_ids=documents)
    out.loss.backward()
    with torch.no_grad():
        hidden = model.discriminator.encoder(out.corrupted_ids, mask, document_ids=documents,
                                             word_embedding_weight=model.discriminator_embedding_weight())
    grads = gather_full({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, plan, vocab, group)
    return {"mlm": out.generator.loss.item(), "rtd": out.discriminator.loss.item(), "loss": out.loss.item(),
            "mlm_accuracy": out.generator.accuracy.item(), "corrupted": out.corrupted_ids, "hidden": hidden,
            "grads": grads}


def tp_sampling(tp: int, logits_full: torch.Tensor, vocab: int, seed: int, config_dict: dict) -> torch.Tensor:
    """Samples of vocabulary-split logits (each rank passes its columns)."""
    group = initialize(tp).tp
    model = ReplacedTokenDetection(rtd_config_from_dict(config_dict), group)
    rows = logits_full.shape[1]
    padded = torch.nn.functional.pad(logits_full, (0, -rows % (128 * tp) if tp > 1 else 0))
    local = padded.chunk(tp, dim=1)[group.rank]
    ids = torch.zeros(1, logits_full.shape[0], dtype=torch.long)
    labels = torch.zeros_like(ids)
    corrupted, _ = model.corrupt(ids, labels, local, torch.Generator().manual_seed(seed))
    return corrupted[0]

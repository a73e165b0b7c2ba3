"""No host synchronisation inside a micro-step of the model, and a lean vocabulary path.

A TorchDispatchMode sees every aten call of one forward + backward of the RTD pair on the CPU
and records those that make the host wait for a GPU: reading a value (`_local_scalar_dense`,
behind .item() / int() / .tolist()), data-dependent shapes (`nonzero`, `masked_select`, boolean
indexing, `unique`), copies to the CPU. On the CPU they cost nothing, but the same aten calls
stall the host on a GPU, so none may come from model code (deberta_ds/model, deberta_ds/parallel).

What DeepSpeed's engine.step() adds (measured with this recorder on one decoupled micro-step,
ZeRO-2 bf16, deepspeed 0.19.8, CPU): per engine and parameter group, one read of the clipping
norm's validity (`is_invalid_grad_norm` in `unscale_and_clip_grads`, whenever clipping is on);
with `bf16.check_grad_overflow` on (DeepSpeed's default, off in ds_configs/) also one read of the
overflow flag (`has_overflow`, after an inf/nan scan of every gradient partition) and one more
norm-validity read per engine: 12 reads per micro-step instead of 8. The rest come from torch's
CPU AdamW (its step counter; the fused CUDA AdamW keeps it on the device). The trainer's own
agreement (engines._agree: one .tolist() of a two-element all-reduce) is the loop's one
deliberate synchronisation per micro-batch (.tolist() reads CPU memory without an aten call, so
only a GPU run shows it, as a copy to the CPU).
"""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deberta_ds.config import RTDConfig, preset
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.rtd import IGNORE_INDEX, masked_positions
from deberta_ds.parallel.layers import vocab_parallel_cross_entropy
from deberta_ds.parallel.state import TensorParallel
from tests.test_rtd_model import MASK_ID, make_rtd, masked_batch

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
           "unique_consecutive", "repeat_interleave"}


class SyncRecorder(TorchDispatchMode):
    """Records (op, innermost deberta_ds frame) of every aten call that would synchronise a GPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        index_lists = [a for a in args if isinstance(a, (list, tuple))]
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for lst in index_lists for t in lst)
        to_cpu = name in ("_to_copy", "copy_") and kwargs.get("device") == torch.device("cpu") and any(
            t.device.type != "cpu" for t in tensors)
        if name in SYNCING or boolean_index or to_cpu or self._from_cpu(name, args, kwargs):
            self.calls.append((name, self._site()))
        return func(*args, **kwargs)

    @staticmethod
    def _from_cpu(name, args, kwargs) -> bool:
        """A copy of host memory to a device (.to(device) or copy_ of a CPU tensor): the host waits for
        the device's queue before the copy. (A CPU scalar tensor passed to a device op is not one: its
        value travels as a kernel argument. torch.tensor(data, device=...) copies below the dispatcher,
        unseen here: the code under test builds its tensors from aranges.)"""
        if name == "_to_copy":
            device = kwargs.get("device")
            return args[0].device.type == "cpu" and device is not None and torch.device(device).type != "cpu"
        return name == "copy_" and args[0].device.type != "cpu" and isinstance(args[1], torch.Tensor) and \
            args[1].device.type == "cpu"

    @staticmethod
    def _site() -> str:
        frames = [f for f in traceback.extract_stack() if "/deberta_ds/" in f.filename]
        return f"{frames[-1].filename.split('/deberta_ds/')[-1]}:{frames[-1].lineno}" if frames else "outside"


@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_one_micro_step_of_the_pair_makes_no_host_sync_in_model_code(sharing):
    model = make_rtd(sharing)
    model.train()
    ids, mask, labels = masked_batch(lengths=(40, 33), every=3)
    masked = masked_positions(labels)  # on the host, as the prefetcher builds it
    # The first call at a length computes the reference attention's reachable slot range on the
    # host (CPU tensors, cached per length: relative_position.reachable_slots); steady state is step 2.
    model(ids, mask, labels, rng=torch.Generator().manual_seed(0), masked=masked).loss.backward()
    recorder = SyncRecorder()
    with recorder:
        out = model(ids, mask, labels, rng=torch.Generator().manual_seed(0), masked=masked)
        out.loss.backward()
    assert recorder.calls == []


def test_the_recorder_sees_the_syncs_the_old_code_made():
    """The mode is not blind: boolean indexing, .item() and nonzero are each recorded."""
    recorder = SyncRecorder()
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 7]])
    with recorder:
        masked_positions(labels)                                  # nonzero, by design on the host
        labels[labels != IGNORE_INDEX].float().mean().item()
    ops = [op for op, _ in recorder.calls]
    assert "nonzero" in ops and "index" in ops and "_local_scalar_dense" in ops


def test_the_fused_kernels_host_side_copies_nothing_to_the_device_at_new_lengths():
    """The fused attention's tables, folds, document ranges and dropout seed at lengths seen for the
    first time (and again past the fold cache) are built on the device: no host->device copy.
    The meta device stands in for the GPU (the CPU machine has none; the kernels do not run)."""
    from deberta_ds.kernels import tables
    from deberta_ds.kernels.fused import dropout_seed

    device = torch.device("meta")
    recorder = SyncRecorder()
    tables._folds.cache_clear()
    layouts = {seq_len: tables.layout(seq_len, 4, 8, 96) for seq_len in (37, 50)}  # host arithmetic on CPU tensors
    with recorder:
        for seq_len in (37, 50, 37):
            q, k = torch.randn(2, 2, seq_len, 16, device=device), torch.randn(2, 2, seq_len, 16, device=device)
            pos_key, pos_query = torch.randn(2, 8, 16, device=device), torch.randn(2, 8, 16, device=device)
            lay = layouts[seq_len]
            e, f = tables.position_tables(q, k, pos_key, pos_query, lay, 0.1)
            sat = torch.zeros(4, seq_len, 2, device=device)
            tables.fold_gradients(q, k, pos_key, pos_query, torch.zeros_like(e), torch.zeros_like(f), sat, sat, lay,
                                  0.1)
            tables.document_ranges(torch.zeros(2, seq_len, dtype=torch.long, device=device))
            dropout_seed(None, device)
            tables._folds.cache_clear()   # as when lengths vary past the cache
    assert recorder.calls == []
    with recorder:   # the recorder sees such copies: what the folds did before (built on the host, then .to)
        torch.zeros(3, 4).to(device)
        torch.empty(3, device=device).copy_(torch.arange(3.0))
    assert [op for op, _ in recorder.calls] == ["_to_copy", "copy_"]


def test_padded_masked_positions_change_nothing():
    """The prefetcher's padded rows give the unpadded results: losses, accuracies, samples, gradients."""
    results = []
    for multiple in (1, 128):
        model = make_rtd()
        ids, mask, labels = masked_batch(lengths=(40, 33), every=3)
        out = model(ids, mask, labels, rng=torch.Generator().manual_seed(3), masked=masked_positions(labels, multiple))
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (padded, padded_grads) = results
    assert padded.generator.logits.shape[0] == 128 > plain.generator.logits.shape[0]
    for a, b in [(plain.generator.loss, padded.generator.loss), (plain.generator.accuracy, padded.generator.accuracy),
                 (plain.discriminator.loss, padded.discriminator.loss), (plain.replaced_ratio, padded.replaced_ratio)]:
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert torch.equal(plain.corrupted_ids, padded.corrupted_ids)
    assert torch.equal(plain.discriminator.replaced, padded.discriminator.replaced)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, padded_grads[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch_in_fp32_without_an_fp32_softmax_kept(dtype):
    """Values and gradients equal F.cross_entropy on the fp32 logits; IGNORE_INDEX rows give 0.
    What the backward keeps is the logits as they came plus [M] statistics, no fp32 [M, V]."""
    torch.manual_seed(0)
    logits = (torch.randn(24, 301) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, 301, (24,))
    target[::5] = IGNORE_INDEX
    expected_logits = logits.detach().float().requires_grad_()
    expected = torch.nn.functional.cross_entropy(expected_logits, target, reduction="none")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = vocab_parallel_cross_entropy(logits, target, 301, TensorParallel())
    weights = torch.randn(24)
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16 once
    assert torch.allclose(logits.grad.float(), expected_logits.grad, atol=tolerance)
    assert logits.grad.dtype == dtype
    assert [t.dtype for t in saved if t.numel() == logits.numel()] == [dtype]


def test_flops_config_and_sampling_config_agree_on_the_vocabulary():
    """The samples are ids of the real vocabulary at TP = 1 (no padding copy, no padded column)."""
    config = RTDConfig(discriminator=preset("tiny", vocab_size=300), mask_token_id=MASK_ID)
    model = ReplacedTokenDetection(config)
    logits = torch.zeros(4000, 300)
    logits[:, -1] = 3.0  # the last real id is the likeliest
    ids = torch.zeros(1, 4000, dtype=torch.long)
    corrupted, _ = model.corrupt(ids, torch.ones_like(ids), logits, torch.Generator().manual_seed(0))
    assert corrupted.max() == 299 and (corrupted == 299).float().mean() > 0.05


def test_prefetched_batches_carry_padded_masked_positions():
    from deberta_ds.training.prefetch import to_tensors

    _, _, labels = masked_batch(lengths=(40, 33), every=3)
    batch = to_tensors({"input_ids": labels.clamp(min=0).numpy(), "labels": labels.numpy()})
    flat = labels.flatten()
    real = torch.nonzero(flat != IGNORE_INDEX)[:, 0]
    index, targets = batch["masked_index"], batch["masked_labels"]
    assert index.shape == targets.shape == (128,) and len(real) < 128
    assert torch.equal(index[:len(real)], real) and torch.equal(targets[:len(real)], flat[real])
    assert (index[len(real):] == flat.numel()).all() and (targets[len(real):] == IGNORE_INDEX).all()

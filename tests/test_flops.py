"""Model FLOPs (the MFU numerator) against torch's own FlopCounterMode, within 2%, on small configs.

FlopCounterMode counts the matrix products of one forward + backward as torch runs them; each
system's count (ours: RTDConfig.training_flops; HF DeBERTa MLM: ModelConfig.mlm_training_flops;
ModernBERT: train_bench.modernbert_training_flops) must agree with it.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.train_bench import modernbert_training_flops
from deberta_ds.config import RTDConfig, preset
from deberta_ds.model import ReplacedTokenDetection
from tests.test_rtd_model import MASK_ID, masked_batch

TOLERANCE = 0.02


def counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("sharing", ["gdes", "nes"])
@pytest.mark.parametrize("pos_att_type", [("p2c", "c2p"), ("c2p",)])
def test_rtd_pair_flops_match_flop_counter(sharing, pos_att_type):
    config = RTDConfig(discriminator=preset("tiny", attention_impl="reference", pos_att_type=pos_att_type),
                       embedding_sharing=sharing, mask_token_id=MASK_ID)
    torch.manual_seed(0)
    model = ReplacedTokenDetection(config)
    ids, mask, labels = masked_batch(lengths=(40, 40, 33), every=3)
    masked_rows = int((labels != -100).sum())
    measured = counted(lambda: model(ids, mask, labels).loss.backward())
    expected = config.training_flops(ids.shape[1], ids.shape[0], masked_rows)
    assert expected == pytest.approx(measured, rel=TOLERANCE)
    assert expected == measured  # exact here: every product is counted (K/V twice in the EMD would be +2.3%)


def test_flops_per_token_counts_the_vocabulary_only_on_masked_rows():
    config = RTDConfig(discriminator=preset("base"))
    per_token = config.flops_per_token(512, 0.15, 64)
    # The FlopCounterMode count on the base pair: about 1.08 GFLOP per token, not 6N's 2.02.
    assert 1.0e9 < per_token < 1.1e9
    more_masked = config.flops_per_token(512, 0.30, 64) - per_token
    assert more_masked == pytest.approx(3 * 2 * 0.15 * 768 * (768 + 128100), rel=1e-9)


def test_hf_deberta_mlm_flops_match_flop_counter():
    transformers = pytest.importorskip("transformers")
    from deberta_ds.hf_format import model_config_to_hf

    ours = preset("tiny")
    hf_config = transformers.DebertaV2Config(**model_config_to_hf(ours))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DebertaV2ForMaskedLM(hf_config)
    ids, mask, labels = masked_batch(lengths=(48, 48), every=3)
    measured = counted(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward())
    assert ours.mlm_training_flops(ids.shape[1], ids.shape[0]) == pytest.approx(measured, rel=TOLERANCE)


def test_modernbert_flops_match_flop_counter():
    transformers = pytest.importorskip("transformers")
    config = transformers.ModernBertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=96, vocab_size=512, pad_token_id=0, local_attention=16,
                                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(config)
    ids = torch.randint(1, 512, (2, 48))
    labels = ids.clone()
    measured = counted(lambda: model(input_ids=ids, labels=labels).loss.backward())
    # Eager attention computes every score of the sliding-window layers and masks most of them.
    assert modernbert_training_flops(config, 48, 2, sliding_window=False) == pytest.approx(measured, rel=TOLERANCE)
    # The model FLOPs count only what a window of |i - j| <= 8 needs: one of three layers is global.
    saved = modernbert_training_flops(config, 48, 2, sliding_window=False) - modernbert_training_flops(config, 48, 2)
    window_pairs = sum(1 for i in range(48) for j in range(48) if abs(i - j) <= 8)
    assert saved == 3 * 4.0 * 2 * 64 * (48 * 48 - window_pairs) * 2  # 2 sliding layers

"""Hugging Face ``DebertaV2`` checkpoints: their configuration and key layout against ours, read
into our models and our models' weights in their layout (written by ``deberta_ds.convert``).

HF directory: ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``, loaded
weights-only). ``--part discriminator`` is the ``DebertaV2Model`` layout (unprefixed backbone
keys, E_G + E_delta merged); ``--part generator`` the ``DebertaV2ForMaskedLM`` layout
(``deberta.`` backbone, legacy ``cls.predictions`` head tied to the word embedding). HF has no
enhanced mask decoder, so the generator's EMD position table is not exported.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deberta_ds.checkpoint_reader import WEIGHTS, load_strict
from deberta_ds.config import ModelConfig, RTDConfig, parse_config_text
from deberta_ds.errors import CheckpointError
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.safe_load import weights_only_loads

# (our name inside an Encoder, HF name inside DebertaV2Model); "{i}" is the layer index.
_ENCODER_KEYS = [
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
    ("rel_embeddings", "encoder.rel_embeddings.weight"),
    ("rel_norm.{p}", "encoder.LayerNorm.{p}"),
    ("layers.{i}.attention.query.{p}", "encoder.layer.{i}.attention.self.query_proj.{p}"),
    ("layers.{i}.attention.key.{p}", "encoder.layer.{i}.attention.self.key_proj.{p}"),
    ("layers.{i}.attention.value.{p}", "encoder.layer.{i}.attention.self.value_proj.{p}"),
    ("layers.{i}.attention.pos_key.{p}", "encoder.layer.{i}.attention.self.pos_key_proj.{p}"),
    ("layers.{i}.attention.pos_query.{p}", "encoder.layer.{i}.attention.self.pos_query_proj.{p}"),
    ("layers.{i}.attention_out.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("layers.{i}.attention_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("layers.{i}.ffn_in.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("layers.{i}.ffn_out.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("layers.{i}.ffn_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
]
_LM_HEAD_KEYS = [("dense.{p}", "cls.predictions.transform.dense.{p}"),
                 ("norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
                 ("bias", "cls.predictions.bias")]
# Non-legacy HF MLM heads and the published V3 checkpoints' RTD head ("mask_predictions").
_LM_HEAD_KEYS_NEW = [("dense.{p}", "lm_predictions.lm_head.dense.{p}"),
                     ("norm.{p}", "lm_predictions.lm_head.LayerNorm.{p}"),
                     ("bias", "lm_predictions.lm_head.bias")]
_RTD_HEAD_KEYS = [("norm.{p}", "mask_predictions.LayerNorm.{p}"),
                  ("dense.{p}", "mask_predictions.dense.{p}"),
                  ("classifier.{p}", "mask_predictions.classifier.{p}")]


def _pattern_to_regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped + "$")


def _rename(state: dict, table, src: int, dst: int, src_prefix: str = "", dst_prefix: str = "") -> dict:
    """Rename keys src_prefix+table[src] -> dst_prefix+table[dst]; unmatched keys are left out."""
    rules = [(_pattern_to_regex(src_prefix + pair[src]), dst_prefix + pair[dst]) for pair in table]
    out = {}
    for key, tensor in state.items():
        for regex, target in rules:
            match = regex.match(key)
            if match:
                out[target.format(**match.groupdict())] = tensor
                break
    return out


# ---------------------------------------------------------------- configs

def hf_to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    def fail(message: str):
        raise CheckpointError(f"{source}: {message}")

    if hf.get("model_type") not in ("deberta-v2", None):
        fail(f"model_type is {hf.get('model_type')!r}; only DeBERTa-v2/v3 ('deberta-v2') checkpoints convert")
    if not hf.get("relative_attention", False):
        fail("relative_attention is off; deberta_ds implements DeBERTa-v2/v3 disentangled attention only")
    pos_att_type = hf.get("pos_att_type") or []
    if isinstance(pos_att_type, str):
        pos_att_type = [t.strip() for t in pos_att_type.lower().split("|") if t.strip()]
    unsupported = [t for t in pos_att_type if t not in ("c2p", "p2c")]
    if unsupported:
        fail(f"pos_att_type contains unsupported terms {unsupported}; only c2p and p2c are supported")
    if hf.get("position_buckets", -1) <= 0:
        fail("position_buckets must be > 0 (log-bucketed relative positions, as in DeBERTaV3)")
    if "layer_norm" not in str(hf.get("norm_rel_ebd", "none")):
        fail(f"norm_rel_ebd is {hf.get('norm_rel_ebd')!r}; DeBERTaV3 normalises the table with 'layer_norm'")
    if hf.get("position_biased_input", True):
        fail("position_biased_input is true; DeBERTaV3 does not add absolute positions to the input")
    if hf.get("conv_kernel_size", 0) > 0:
        fail("conv_kernel_size > 0 (the DeBERTa-v2 convolution layer) is not supported")
    if hf.get("embedding_size", hf.get("hidden_size")) != hf.get("hidden_size"):
        fail("embedding_size differs from hidden_size (embed_proj) which is not supported")
    if hf.get("type_vocab_size", 0) > 0:
        fail("type_vocab_size > 0 (token type embeddings) is not supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        fail(f"hidden_act is {hf.get('hidden_act')!r}; only exact 'gelu' is supported")
    max_rel = hf.get("max_relative_positions", -1)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            position_buckets=hf["position_buckets"],
            max_relative_positions=max_rel if max_rel > 0 else hf.get("max_position_embeddings", 512),
            share_att_key=hf.get("share_att_key", False), pos_att_type=tuple(pos_att_type),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0) or 0)
    except KeyError as missing:
        fail(f"missing field {missing}")
    except ValueError as bad:
        fail(str(bad))


def model_config_to_hf(config: ModelConfig) -> dict:
    return {
        "model_type": "deberta-v2", "architectures": ["DebertaV2Model"],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": 0,
        "initializer_range": config.initializer_range, "layer_norm_eps": config.layer_norm_eps,
        "relative_attention": True, "max_relative_positions": config.max_relative_positions,
        "position_buckets": config.position_buckets, "pad_token_id": config.pad_token_id,
        "position_biased_input": False, "pos_att_type": list(config.pos_att_type),
        "norm_rel_ebd": "layer_norm", "share_att_key": config.share_att_key, "legacy": True,
    }


# ---------------------------------------------------------------- HF files

def read_hf_checkpoint(hf_dir: str | Path) -> tuple[dict, dict]:
    """(config dict, state dict) of an HF directory, with clear errors for what is missing."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; --hf must name a Hugging Face checkpoint directory")
    config = parse_config_text(config_path.read_text(errors="replace"), "json", str(config_path))
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a Hugging Face config (a JSON object of fields)")
    if (hf_dir / WEIGHTS).is_file():
        try:
            state = load_file(str(hf_dir / WEIGHTS))
        except SafetensorError as error:
            raise CheckpointError(f"{hf_dir / WEIGHTS}: cannot be read, the file is truncated or damaged "
                                  f"({error})") from None
    elif (hf_dir / "pytorch_model.bin").is_file():
        with weights_only_loads():  # a pickle holding anything but tensors is refused by name, not a traceback
            state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{hf_dir}: neither {WEIGHTS} nor pytorch_model.bin found")
    return config, state


def _backbone_prefix(state: dict, source: str) -> str:
    for prefix in ("", "deberta."):
        if prefix + "embeddings.word_embeddings.weight" in state:
            return prefix
    raise CheckpointError(f"{source}: no 'embeddings.word_embeddings.weight' (or 'deberta.' prefixed) key; "
                          "this is not a DeBERTa-v2/v3 checkpoint")


def _encoder_state_from_hf(state: dict, prefix: str, source: str) -> dict:
    ours = _rename(state, _ENCODER_KEYS, 1, 0, src_prefix=prefix)
    backbone = {k for k in state if k.startswith(prefix + "embeddings.") or k.startswith(prefix + "encoder.")}
    ignored = {prefix + "embeddings.position_embeddings.weight"}
    unmapped = sorted(backbone - ignored - {prefix + hf for hf in _rename(ours, _ENCODER_KEYS, 0, 1)})
    if unmapped:
        raise CheckpointError(f"{source}: backbone keys not understood: {unmapped[:6]}")
    return ours


def encoder_from_hf(hf_dir: str | Path) -> Encoder:
    config, state = read_hf_checkpoint(hf_dir)
    model_config = hf_to_model_config(config, f"{hf_dir}/config.json")
    encoder = Encoder(model_config)
    load_strict(encoder, _encoder_state_from_hf(state, _backbone_prefix(state, str(hf_dir)), str(hf_dir)),
                str(hf_dir))
    return encoder


def _load_head(module: torch.nn.Module, state: dict, tables, source: str) -> bool:
    """Load a head from the first key table that matches any key; False when none does."""
    for table in tables:
        head = _rename(state, table, 1, 0)
        if head:
            load_strict(module, head, source)
            return True
    return False


def rtd_from_hf(discriminator_dir: str | Path, generator_dir: str | Path | None = None,
                embedding_sharing: str = "gdes", mask_token_id: int | None = None) -> ReplacedTokenDetection:
    """An RTD pair for continued pre-training: the discriminator (and generator when given) from HF.

    Under GDES/ES the discriminator's embedding becomes E_G (the generator's, or the
    discriminator's own when no generator is given) and E_delta = E_D - E_G, so E_G + E_delta
    reproduces the discriminator exactly.
    """
    disc_hf, disc_state = read_hf_checkpoint(discriminator_dir)
    disc_config = hf_to_model_config(disc_hf, f"{discriminator_dir}/config.json")
    gen_state, generator_layers = None, None
    if generator_dir is not None:
        gen_hf, gen_state = read_hf_checkpoint(generator_dir)
        gen_config = hf_to_model_config(gen_hf, f"{generator_dir}/config.json")
        if gen_config.replace(num_layers=disc_config.num_layers) != disc_config:
            raise CheckpointError(f"{generator_dir}: generator width/heads/FFN/vocab differ from the discriminator")
        generator_layers = gen_config.num_layers
    config = RTDConfig(discriminator=disc_config, generator_layers=generator_layers,
                       embedding_sharing=embedding_sharing,
                       mask_token_id=mask_token_id if mask_token_id is not None else disc_config.vocab_size - 100)
    model = ReplacedTokenDetection(config)
    disc_encoder = _encoder_state_from_hf(disc_state, _backbone_prefix(disc_state, str(discriminator_dir)),
                                          str(discriminator_dir))
    disc_embedding = disc_encoder["embeddings.word_embeddings.weight"]
    with torch.no_grad():
        if gen_state is not None:
            prefix = _backbone_prefix(gen_state, str(generator_dir))
            gen_encoder = _encoder_state_from_hf(gen_state, prefix, str(generator_dir))
            model.generator.encoder.load_state_dict(gen_encoder)
            _load_head(model.generator.lm_head, gen_state, [_LM_HEAD_KEYS, _LM_HEAD_KEYS_NEW], str(generator_dir))
            if prefix + "embeddings.position_embeddings.weight" in gen_state:
                model.generator.emd.position_embeddings.weight.copy_(
                    gen_state[prefix + "embeddings.position_embeddings.weight"])
        else:
            model.generator.word_embeddings.weight.copy_(disc_embedding)
        if embedding_sharing == "nes":
            model.discriminator.encoder.load_state_dict(disc_encoder)
        else:
            disc_encoder.pop("embeddings.word_embeddings.weight")
            model.discriminator.encoder.load_state_dict(disc_encoder)
            if embedding_sharing == "gdes":
                model.discriminator.embedding_delta.copy_(disc_embedding - model.generator.word_embeddings.weight)
        _load_head(model.discriminator.head, disc_state, [_RTD_HEAD_KEYS], str(discriminator_dir))
    return model


def encoder_state_to_hf(encoder_state: dict, prefix: str = "") -> dict:
    return _rename(encoder_state, _ENCODER_KEYS, 0, 1, dst_prefix=prefix)


def from_hf(hf_dir, generator_dir=None, *, as_rtd: bool = False, embedding_sharing: str = "gdes"):
    """An HF DebertaV2 checkpoint as our Encoder, or as an RTD pair (as_rtd / generator_dir given)."""
    if as_rtd or generator_dir is not None:
        return rtd_from_hf(hf_dir, generator_dir, embedding_sharing)
    return encoder_from_hf(hf_dir)


def hf_state_from_model(model: Encoder | ReplacedTokenDetection, part: str = "discriminator") -> tuple[dict, dict]:
    """(HF config dict, HF state dict) for an encoder or one part of an RTD pair."""
    if isinstance(model, Encoder):
        if part != "discriminator":
            raise CheckpointError(f"--part {part}: a plain encoder checkpoint has only the backbone; "
                                  "use --part discriminator")
        return model_config_to_hf(model.config), encoder_state_to_hf(model.state_dict())
    if part == "discriminator":
        encoder_state = dict(model.discriminator.encoder.state_dict())
        encoder_state["embeddings.word_embeddings.weight"] = model.export_discriminator_embedding()
        return model_config_to_hf(model.config.discriminator), encoder_state_to_hf(encoder_state)
    if part == "generator":
        generator = model.generator
        hf_config = model_config_to_hf(model.config.generator) | {"architectures": ["DebertaV2ForMaskedLM"]}
        state = encoder_state_to_hf(generator.encoder.state_dict(), prefix="deberta.")
        state |= _rename(generator.lm_head.state_dict(), _LM_HEAD_KEYS, 0, 1)
        return hf_config, state
    raise CheckpointError(f"--part: {part!r} is not 'discriminator' or 'generator'")

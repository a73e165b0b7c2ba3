"""Typed configuration for DeBERTaV3 encoders and the RTD generator/discriminator pair.

Every field is validated in ``__post_init__``; a bad value raises ``UserError`` naming the
field and what to do. Configs round-trip through JSON (``to_dict`` / ``from_dict``), and the
run config (deberta_ds.training.run_config) is read by the same ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field

import yaml

from deberta_ds.errors import UserError, require

POS_ATT_TYPES = ("c2p", "p2c")
EMBEDDING_SHARING_MODES = ("gdes", "es", "nes")
ATTENTION_IMPLS = ("reference", "fused", "auto")


def scale_for(head_dim: int, positional_terms: int) -> float:
    """1 / sqrt(d * (1 + number of positional terms)): one scale for c2c, c2p and p2c (the one home
    of the formula: the model's config and the kernels' default both read it)."""
    return (head_dim * (1 + positional_terms)) ** -0.5


@dataclass
class ModelConfig:
    """Shape and regularisation of one DeBERTaV3 encoder (names follow the paper, not HF)."""

    vocab_size: int = 128100
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    position_buckets: int = 256
    max_relative_positions: int = 512
    share_att_key: bool = True
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    layer_norm_eps: float = 1e-7
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    pad_token_id: int = 0
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        self.pos_att_type = tuple(self.pos_att_type)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "position_buckets", "max_relative_positions", "max_position_embeddings"):
            require(int(getattr(self, name)) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        require(self.position_buckets <= self.max_relative_positions, "position_buckets",
                 f"{self.position_buckets} buckets exceed max_relative_positions={self.max_relative_positions}")
        require(self.position_buckets >= 2, "position_buckets", "needs at least 2 buckets")
        for name in ("hidden_dropout", "attention_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")
        unknown = [t for t in self.pos_att_type if t not in POS_ATT_TYPES]
        require(not unknown, "pos_att_type", f"unsupported terms {unknown}; use a subset of {POS_ATT_TYPES}")
        require(len(set(self.pos_att_type)) == len(self.pos_att_type), "pos_att_type", "duplicated term")
        require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                 f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        require(0 <= self.pad_token_id < self.vocab_size, "pad_token_id", "must be a valid token id")
        require(0 < self.layer_norm_eps < math.inf, "layer_norm_eps", "must be positive and finite")
        require(0 < self.initializer_range < math.inf, "initializer_range",
                f"must be positive and finite (the weights' standard deviation, e.g. 0.02), got "
                f"{self.initializer_range}")

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Clear errors for shapes that cannot be split over `tp_size` ranks (whole heads, FFN columns)."""
        for name in ("num_heads", "intermediate_size"):
            require(getattr(self, name) % tp_size == 0, name,
                     f"{getattr(self, name)} is not divisible by the tensor-parallel size {tp_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_scale(self) -> float:
        return scale_for(self.head_dim, len(self.pos_att_type))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Model FLOPs: the matrix products one forward performs (2 per multiply-add), as
    # torch.utils.flop_counter counts them; a training step is 3x (every product's inputs need a
    # gradient). Element-wise work, lookups and recomputation (activation checkpointing) are not
    # counted, as in MFU's usual definition.

    def relative_span(self, seq_len: int) -> int:
        """Rows of the relative table the reference attention multiplies against at this length
        (the slots reachable from distances -(L-1)..L-1)."""
        from deberta_ds.relative_position import reachable_slots

        first, last = reachable_slots(seq_len, self.position_buckets, self.max_relative_positions)
        return last - first + 1

    def layer_flops(self, seq_len: int, query_rows: int | None = None, key_value: bool = True) -> float:
        """Forward FLOPs of one encoder layer for one sequence: `query_rows` queries (default all
        L) against L keys; key_value False when K and V were projected already (the EMD's second
        pass). The relative table's projections are per call, see `positional_flops`."""
        rows, hidden = seq_len if query_rows is None else query_rows, self.hidden_size
        projections = (2 if key_value else 0) * seq_len * hidden * hidden + 2 * rows * hidden * hidden  # K, V; Q, out
        span = self.relative_span(seq_len)
        scores = rows * seq_len * hidden * 2 + rows * span * hidden * len(self.pos_att_type)  # QK^T, PV; c2p, p2c
        return 2.0 * (projections + scores + 2 * rows * hidden * self.intermediate_size)

    def positional_flops(self, table_rows: int | None = None) -> float:
        """Forward FLOPs of one layer's projections of the relative table (once per forward call,
        whatever the batch): `table_rows` rows (default all 2k) per positional term."""
        rows = 2 * self.position_buckets if table_rows is None else table_rows
        return 2.0 * rows * self.hidden_size * self.hidden_size * len(self.pos_att_type)

    def mlm_training_flops(self, seq_len: int, batch: int) -> float:
        """One training step (forward + backward) of this encoder with an MLM head on every token
        (Hugging Face's DebertaV2ForMaskedLM: dense + LayerNorm + tied decoder), which projects the
        relative table's first 2k rows and multiplies against all of them."""
        hidden, tokens = self.hidden_size, batch * seq_len
        span = 2 * self.position_buckets
        layer = self.layer_flops(seq_len) + 2.0 * seq_len * (span - self.relative_span(seq_len)) * hidden * len(
            self.pos_att_type)
        forward = self.num_layers * (batch * layer + self.positional_flops(span))
        forward += 2.0 * tokens * hidden * (hidden + self.vocab_size)
        return 3.0 * forward


@dataclass
class RTDObjective:
    """The objective's settings: the run config's `rtd` section, and part of every RTDConfig."""

    generator_layers: int | None = None  # None: half the discriminator's layers
    embedding_sharing: str = "gdes"
    rtd_lambda: float = 50.0  # the paper's weight; the published script uses 10
    temperature: float = 1.0

    def __post_init__(self) -> None:
        require(self.generator_layers is None or self.generator_layers >= 1, "rtd.generator_layers",
                 "must be at least 1")
        require(self.embedding_sharing in EMBEDDING_SHARING_MODES, "rtd.embedding_sharing",
                 f"{self.embedding_sharing!r} is not one of {EMBEDDING_SHARING_MODES}")
        require(0 < self.rtd_lambda < math.inf, "rtd.rtd_lambda", f"must be positive and finite, got {self.rtd_lambda}")
        require(0 < self.temperature < math.inf, "rtd.temperature",
                f"must be positive and finite, got {self.temperature}")


@dataclass
class RTDConfig(RTDObjective):
    """An ELECTRA-style generator/discriminator pair as trained for DeBERTaV3."""

    discriminator: ModelConfig = field(default_factory=ModelConfig)
    mask_token_id: int = 128000

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.discriminator, dict):
            self.discriminator = ModelConfig(**self.discriminator)
        if self.generator_layers is None:
            self.generator_layers = max(1, self.discriminator.num_layers // 2)
        require(0 < self.mask_token_id < self.discriminator.vocab_size, "mask_token_id",
                 f"{self.mask_token_id} is outside the vocabulary (vocab_size={self.discriminator.vocab_size})")

    @property
    def generator(self) -> ModelConfig:
        """Same width, heads and FFN as the discriminator, fewer layers."""
        return self.discriminator.replace(num_layers=self.generator_layers)

    def training_flops(self, seq_len: int, batch: int, masked_rows: float, generator_forwards: int = 1) -> float:
        """Model FLOPs of one training micro-step of the pair (forward + backward, see
        ModelConfig.layer_flops) on `batch` sequences with `masked_rows` generator targets in all.

        generator: L_G - 1 layers, then the EMD runs the last layer twice over their output (K, V
        and the relative projections once for both passes), then dense + tied vocabulary head on
        the masked rows only. discriminator: L_D layers + the RTD head (dense, classifier) on every
        token. E_delta and the samples enter no product. `generator_forwards` 2: ES with two
        engines adds a no-grad sampling pass of the generator."""
        gen, disc = self.generator, self.discriminator
        hidden = gen.hidden_size
        per_sequence = (gen.num_layers + 1) * gen.layer_flops(seq_len) - 4.0 * seq_len * hidden * hidden
        generator = batch * per_sequence + gen.num_layers * gen.positional_flops()
        generator += 2.0 * masked_rows * hidden * (hidden + gen.vocab_size)
        discriminator = batch * disc.num_layers * disc.layer_flops(seq_len) + disc.num_layers * disc.positional_flops()
        discriminator += 2.0 * batch * seq_len * disc.hidden_size * (disc.hidden_size + 1)
        return 3.0 * (generator + discriminator) + (generator_forwards - 1) * generator

    def flops_per_token(self, seq_len: int, masked_fraction: float, batch: int, generator_forwards: int = 1
                        ) -> float:
        """training_flops per token of a micro-batch of `batch` sequences, a `masked_fraction` of
        whose tokens are generator targets (the masking probability, for packed samples)."""
        tokens = batch * seq_len
        return self.training_flops(seq_len, batch, masked_fraction * tokens, generator_forwards) / tokens


def _matches(value, annotation) -> bool:
    """Whether a value read from YAML/JSON has the field's type (bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in args)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) for item in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _yaml_number_hint(value) -> str:
    """For text that reads as a number (YAML 1.1 takes 1e-3 and 1.0e9 as text): how to write it."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    mantissa, _, exponent = value.lower().partition("e")
    if not exponent:
        return ""
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
    return f" (YAML 1.1 reads {value} as text: write {mantissa}e{exponent})"


def short_repr(value) -> str:
    """A bounded repr for error messages (a config may be huge: an alias bomb expands exponentially)."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxdict, bounded.maxlist, bounded.maxstring, bounded.maxother = 2, 6, 6, 80, 80
    return bounded.repr(value)


def from_dict(cls, data: dict | None, where: str = ""):
    """A config dataclass from a JSON/YAML mapping: unknown fields and values of the wrong type
    are errors naming the dotted field; nested sections are built the same way; then the class
    validates its values. The one reader for every config (model, RTD pair, run)."""
    data = {} if data is None else data
    require(isinstance(data, dict), where or "config", f"must be a mapping of fields, got {short_repr(data)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    require(not unknown, where or "config", f"unknown fields {unknown}; known: {sorted(known)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    require(not missing, where or "config", f"missing fields {missing}")
    hints, built = typing.get_type_hints(cls), {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]) and not dataclasses.is_dataclass(value):
            built[name] = from_dict(hints[name], value, dotted)
            continue
        yaml_hint = _yaml_number_hint(value) if _matches(0.0, hints[name]) else ""
        require(_matches(value, hints[name]), dotted,
                 f"{short_repr(value)} is not of type {getattr(hints[name], '__name__', hints[name])}{yaml_hint}")
        built[name] = value
    return cls(**built)


# Bounds on every config text read (run configs, overrides, DeepSpeed JSON, checkpoint metadata): a
# few hundred bytes of YAML aliases expand to billions of nodes, and deep nesting exhausts the stack.
MAX_DEPTH = 32
MAX_NODES = 100_000


class BoundedYAMLLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)
    and nesting deeper than MAX_DEPTH (the composer recurses per level)."""

    def compose_node(self, parent, index):
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: a key given twice is an error (plain JSON keeps the last)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"the key(s) {repeated} are given twice in one object")
    return dict(pairs)


def _check_size(data, where: str, count_nodes: bool) -> None:
    """Refuse a value nested deeper than MAX_DEPTH or, with count_nodes (YAML: aliases followed), expanding to
    more than MAX_NODES values; stops early."""
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        require(not count_nodes or nodes <= MAX_NODES, where, f"expands to more than {MAX_NODES:,} values (YAML "
                "aliases that multiply, an 'alias bomb'?); a run config is a few hundred")
        require(depth <= MAX_DEPTH, where, f"nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def parse_config_text(text: str, kind: str, where: str):
    """A config text (`kind` json or yaml) as plain data, within MAX_DEPTH and MAX_NODES, keys
    unique; anything else is a UserError naming `where` (a file, a field, an override)."""
    try:
        data = (json.loads(text, object_pairs_hook=_unique_keys) if kind == "json"
                else yaml.load(text, Loader=BoundedYAMLLoader))
    except RecursionError:
        raise UserError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, yaml.YAMLError) as error:  # ValueError: JSONDecodeError and repeated keys
        raise UserError(f"{where}: not valid {kind.upper()}: {error}") from None
    # JSON has no aliases: its size is its text's, and the program's own files (COMPLETE lists every
    # checkpoint file) may hold more than a run config's MAX_NODES values
    _check_size(data, where, count_nodes=kind == "yaml")
    return data


def to_dict(config) -> dict:
    """A config dataclass as a plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data)


def rtd_config_from_dict(data: dict) -> RTDConfig:
    return from_dict(RTDConfig, data)


PRESETS: dict[str, dict] = {
    # A few-thousand-parameter model for tests and the CPU quickstart.
    "tiny": dict(vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                 position_buckets=32, max_relative_positions=128),
    # Published DeBERTaV3 shapes (discriminator; the generator has half the layers).
    "xsmall": dict(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"model preset: unknown name {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

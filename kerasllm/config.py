"""Model configurations: one dataclass per family, JSON round-trip, named presets.

This module imports no TensorFlow: the ONNX runtime reads the same config from a
bundle's manifest.

Shapes used throughout kerasllm: `B` batch, `T` new tokens, `P` past (cached)
tokens, `S = P + T` attended tokens, `H` heads, `D` head size, `C` hidden size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

from kerasllm.errors import UsageError

POSITION_KINDS = ("learned", "sinusoidal", "rotary")
ACTIVATIONS = ("gelu", "relu", "swiglu")


class Rule(NamedTuple):
    """What one config field must hold: a value of `kind` passing `test`, described by `text`
    in the error. bool fields take only True/False, int fields only ints (not bools), float
    fields ints or finite floats; `optional` fields may also be None."""

    kind: type
    text: str
    test: Callable[[Any], bool] = lambda value: True
    optional: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.kind is float:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        elif self.kind is list:
            ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        else:
            ok = isinstance(value, self.kind)
        return ok and self.test(value)


POSITIVE = Rule(int, "a positive integer", lambda v: v > 0)
# The longest max_length a config may give (1M positions): far past any context this library trains,
# and a bound on what a hand-edited manifest or config.json can make the runtime allocate (a decode's
# token and mask arrays, a shared KV buffer: 10**12 had been a 233 TiB request, 4,000,000 took 3 GB).
MAX_LENGTH_CEILING = 1 << 20
TOKEN_ID = Rule(int, "a non-negative integer", lambda v: v >= 0)
FLAG = Rule(bool, "true or false")


def python_number(value: Any) -> Any:
    """NumPy's number scalars as Python's (np.int64(64) -> 64), anything else as it is: a
    vocabulary size computed with NumPy (`ids.max() + 1`) is a size all the same, and a config
    holds values JSON can write."""
    if isinstance(value, list):
        return [python_number(item) for item in value]
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def head_problem(hidden_dim: int, num_heads: int, rotary: bool) -> str | None:
    """Why `num_heads` attention heads cannot split a width of `hidden_dim`, or None: the rule
    the configs and `kerasllm.layers.TransformerBlock` share."""
    if hidden_dim % num_heads:
        return f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}"
    if rotary and (hidden_dim // num_heads) % 2:
        return f"rotary positions need an even head size, got {hidden_dim // num_heads}"
    return None


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(str, f"one of {choices}", lambda v: v in choices)


@dataclass
class TransformerConfig:
    """What every family shares: the stack of blocks and its embeddings.

    Attributes:
        vocab_size: number of token ids (the tokenizer's vocabulary size).
        max_length: the longest sequence the model accepts (positions).
        num_layers: number of transformer blocks.
        num_heads: attention heads per block; `hidden_dim` must divide evenly.
        hidden_dim: width of the residual stream `C`.
        intermediate_dim: width of the feed-forward block (4 x C is usual).
        dropout: dropout rate on attention weights and residual branches.
        activation: "gelu", "relu" or "swiglu" (gated, as in LLaMA/PaLM).
        position: "learned", "sinusoidal" or "rotary" position information.
        norm_first: pre-LN blocks (GPT-2 and later) when True, post-LN
            (the original Transformer, BERT) when False.
        tie_embeddings: the output projection reuses the token embedding.
        layer_norm_epsilon: epsilon of every LayerNormalization.
        use_bias: biases in the attention and feed-forward projections.
        pad_id, bos_id, eos_id: special token ids (the tokenizer sets them).
    """

    family: ClassVar[str] = "transformer"
    # Every field's type and range (checked first by `validate`, before the checks across fields).
    rules: ClassVar[dict[str, Rule]] = {
        **dict.fromkeys(("vocab_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim"), POSITIVE),
        "max_length": Rule(int, f"a positive integer up to {MAX_LENGTH_CEILING}", lambda v: 0 < v <= MAX_LENGTH_CEILING),
        "dropout": Rule(float, "a number in [0, 1)", lambda v: 0 <= v < 1),
        "activation": one_of(ACTIVATIONS),
        "position": one_of(POSITION_KINDS),
        **dict.fromkeys(("norm_first", "tie_embeddings", "use_bias"), FLAG),
        "layer_norm_epsilon": Rule(float, "a positive number", lambda v: v > 0),
        **dict.fromkeys(("pad_id", "bos_id", "eos_id"), TOKEN_ID),
    }

    vocab_size: int = 256
    max_length: int = 128
    num_layers: int = 2
    num_heads: int = 2
    hidden_dim: int = 32
    intermediate_dim: int = 128
    dropout: float = 0.0
    activation: str = "gelu"
    position: str = "learned"
    norm_first: bool = True
    tie_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = True
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, python_number(getattr(self, field.name)))
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            rule = self.rules[field.name]
            if not rule.accepts(value):
                raise UsageError(f"config: {field.name} must be {rule.text}, got {value!r}")
        problem = head_problem(self.hidden_dim, self.num_heads, self.position == "rotary")
        if problem:
            raise UsageError(f"config: {problem}")
        for name, (limit_name, limit) in self.id_limits().items():
            if getattr(self, name) >= limit:
                raise UsageError(f"config: {name} must be below {limit_name} {limit}, got {getattr(self, name)!r}")

    def id_limits(self) -> dict[str, tuple[str, int]]:
        """Each special id field -> the vocabulary (field name, size) it must lie in."""
        return dict.fromkeys(("pad_id", "bos_id", "eos_id"), ("vocab_size", self.vocab_size))

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        values = dict(values)
        family = values.pop("family", cls.family)
        if family != cls.family:
            raise UsageError(f"config: family is {family!r}, expected {cls.family!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(
                f"config: unknown key {unknown[0]!r} for {cls.__name__} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_dict(read_config_json(path))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TransformerConfig":
        presets = PRESETS.get(cls.family, {})
        if name not in presets:
            raise UsageError(f"unknown preset {name!r} for {cls.family} (choose from {', '.join(presets)})")
        return cls.from_dict({**presets[name], **overrides})

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class DecoderConfig(TransformerConfig):
    """GPT-like decoder-only language model (causal LM)."""

    family: ClassVar[str] = "decoder"
    rules: ClassVar[dict[str, Rule]] = {
        **TransformerConfig.rules,
        # A prompt token and a new one: max_length 1 had trained, then could neither export nor generate.
        "max_length": Rule(int, f"an integer from 2 (a prompt token and a new one) up to {MAX_LENGTH_CEILING}",
                           lambda v: 2 <= v <= MAX_LENGTH_CEILING),
    }


@dataclass
class EncoderConfig(TransformerConfig):
    """BERT-like encoder (masked LM, classification, embeddings)."""

    family: ClassVar[str] = "encoder"
    rules: ClassVar[dict[str, Rule]] = {
        **TransformerConfig.rules,
        "num_labels": Rule(int, "a non-negative integer (0: no classifier head)", lambda v: v >= 0),
        "mask_id": TOKEN_ID,
        "pooling": one_of(("cls", "mean")),
    }
    norm_first: bool = False
    tie_embeddings: bool = True
    num_labels: int = 0
    mask_id: int = 4
    pooling: str = "cls"

    def id_limits(self) -> dict[str, tuple[str, int]]:
        return {**super().id_limits(), "mask_id": ("vocab_size", self.vocab_size)}


@dataclass
class Seq2SeqConfig(TransformerConfig):
    """Encoder-decoder (Transformer/T5/BART-like) with cross-attention.

    `num_layers` is the encoder depth; `num_decoder_layers` the decoder's (0 or None: same).
    `target_vocab_size` 0 (or None) means source and target share one vocabulary; with
    separate vocabularies `bos_id` and `eos_id` are target ids and `pad_id` pads both.
    `suppress_ids`: target ids generation never produces, besides `pad_id` and `bos_id`
    (always suppressed; see `suppressed_ids`). `kerasllm train seq2seq` lists the target
    tokenizer's other special tokens but EOS (`<unk>`, `<mask>`, `<sep>`): never targets in
    training, yet a beam's weaker hypotheses may pick one, which decodes to nothing and
    duplicates another hypothesis's text (Hugging Face's `suppress_tokens`).
    """

    family: ClassVar[str] = "seq2seq"
    rules: ClassVar[dict[str, Rule]] = {
        **TransformerConfig.rules,
        "num_decoder_layers": Rule(int, "a non-negative integer (0: num_layers)", lambda v: v >= 0, optional=True),
        "target_vocab_size": Rule(int, "a non-negative integer (0: vocab_size)", lambda v: v >= 0, optional=True),
        "suppress_ids": Rule(list, "a list of integer ids"),
    }
    num_decoder_layers: int = 0
    target_vocab_size: int = 0
    suppress_ids: list[int] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        vocab = self.target_vocab
        bad = [i for i in self.suppress_ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"config: suppress_ids must be target ids in [0, {vocab}), got {bad[0]!r}")
        if self.eos_id in self.suppress_ids:
            raise UsageError(f"config: suppress_ids cannot hold eos_id {self.eos_id} (generation could never end)")

    def id_limits(self) -> dict[str, tuple[str, int]]:
        if not self.target_vocab_size:  # one vocabulary
            return super().id_limits()
        # Targets start with bos_id, end with eos_id and are padded with pad_id, as sources are.
        limits = dict.fromkeys(("pad_id", "bos_id", "eos_id"), ("target_vocab_size", self.target_vocab_size))
        if self.vocab_size < self.target_vocab_size:
            limits["pad_id"] = ("vocab_size", self.vocab_size)
        return limits

    @property
    def suppressed_ids(self) -> tuple[int, ...]:
        """The target ids decoding never chooses (their logits set to -inf before any choice, in
        Keras and on ONNX Runtime alike): pad, BOS and `suppress_ids`, never EOS."""
        return tuple(sorted({self.pad_id, self.bos_id, *self.suppress_ids} - {self.eos_id}))

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def target_vocab(self) -> int:
        return self.target_vocab_size or self.vocab_size


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The keys of a config JSON file (an object), each fault a UsageError naming the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config: {path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise UsageError(f"config: {path}: expected a JSON object")
    return values


CONFIG_CLASSES: dict[str, type[TransformerConfig]] = {
    c.family: c for c in (DecoderConfig, EncoderConfig, Seq2SeqConfig)
}


def config_from_dict(values: dict[str, Any]) -> TransformerConfig:
    """Rebuild a config of any family from `to_dict()` output."""
    family = values.get("family")
    if not isinstance(family, str) or family not in CONFIG_CLASSES:  # (a list is no key: TypeError, not False)
        raise UsageError(f"config: unknown family {family!r} (choose from {', '.join(CONFIG_CLASSES)})")
    return CONFIG_CLASSES[family].from_dict(values)


_SHAPES = {
    # tiny: unit tests on two CPU cores.
    "tiny": dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=128, max_length=128),
    # small: nanoGPT's CPU recipe shape (4 layers, 4 heads, 128 hidden).
    "small": dict(num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=512, max_length=256),
    # base: GPT-2 small / BERT-base shape.
    "base": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072, max_length=1024,
                 dropout=0.1),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "decoder": {name: dict(shape) for name, shape in _SHAPES.items()},
    "encoder": {name: dict(shape, max_length=min(shape["max_length"], 512)) for name, shape in _SHAPES.items()},
    "seq2seq": {name: dict(shape, max_length=min(shape["max_length"], 512)) for name, shape in _SHAPES.items()},
}

"""Architecture of the decoder-only LM and the transformers ``config.json`` it is read from.

:class:`LMConfig` holds the fields of a dense, full-attention Qwen2 / Llama decoder under their
transformers names. :meth:`LMConfig.from_hf_dict` / :meth:`LMConfig.to_hf_dict` convert from and
to a transformers ``config.json`` dict, refusing what the network does not implement
(mixture-of-experts, sliding-window attention, non-SiLU activations, RoPE scaling).
:func:`read_lm_config` reads and type-checks a checkpoint folder's ``config.json`` with the
messages of :mod:`tts_jax.models.checkpoint` (folder, file and key named). See docs/design.md,
"Models we ship".
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from tts_jax.models.checkpoint import read_config

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
CAUSAL_LM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Architecture of a dense, full-attention Qwen2 / Llama decoder (transformers field names).

    Attributes:
        model_type: ``"qwen2"`` (q/k/v projections always have a bias) or ``"llama"``.
        vocab_size, hidden_size, intermediate_size: widths.
        num_hidden_layers, num_attention_heads, num_key_value_heads: depth and (GQA) heads.
        head_dim: per-head width; ``None`` means ``hidden_size // num_attention_heads``.
        rope_theta: RoPE base (default RoPE only).
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: output projection shares the input embedding matrix.
        attention_bias: Llama only: bias on q/k/v/o projections.
        mlp_bias: Llama only: bias on the gate/up/down projections.
        max_position_embeddings: recorded for round trips (the cache size is chosen at run time).
        bos_token_id, eos_token_id, pad_token_id: special tokens (``eos_token_id`` is a tuple).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; the tts-jax LM supports "
                f"{SUPPORTED_MODEL_TYPES} (dense, full attention, default RoPE)"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError(
                "Qwen2 has fixed biases (q/k/v only); attention_bias/mlp_bias are Llama options"
            )

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Builds a config from a transformers ``config.json`` dict.

        Raises:
            ValueError: for another ``model_type``, mixture-of-experts, sliding-window attention,
                a non-SiLU activation, or RoPE scaling other than the default.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; the tts-jax LM supports "
                f"{SUPPORTED_MODEL_TYPES} (dense, full attention, default RoPE)"
            )
        moe = [k for k in _MOE_KEYS if d.get(k)]
        if moe:
            raise ValueError(f"mixture-of-experts configs are not supported (found {moe})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {d['hidden_act']!r}")
        layer_types = set(d.get("layer_types") or ["full_attention"])
        if d.get("use_sliding_window") or layer_types != {"full_attention"}:
            raise ValueError(
                "sliding-window attention is not supported (use_sliding_window / "
                f"layer_types={sorted(layer_types)}); only full attention is"
            )
        eos = d.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rope_theta=_default_rope_theta(d),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False) if model_type == "llama" else False,
            mlp_bias=d.get("mlp_bias", False) if model_type == "llama" else False,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=() if eos is None else tuple(np.atleast_1d(eos).tolist()),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self, architecture: str | None = None) -> dict[str, Any]:
        """The transformers ``config.json`` dict (``architecture`` defaults to the causal LM)."""
        d = {
            "architectures": [architecture or CAUSAL_LM_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_to_hf(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        else:
            d |= {"use_sliding_window": False, "sliding_window": None}
        return d


def _default_rope_theta(d: dict[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    theta = d.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"only default RoPE is supported, got {key}={params}")
        theta = params.get("rope_theta", theta)
    return float(theta)


def _eos_to_hf(eos: tuple[int, ...]) -> int | list[int] | None:
    return None if not eos else eos[0] if len(eos) == 1 else list(eos)


# Types of the transformers config.json keys :meth:`LMConfig.from_hf_dict` reads (other keys are
# not checked) and the keys it cannot default.
HF_CONFIG_TYPES: dict[str, Any] = {
    "architectures": list[str] | None,
    "model_type": str,
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int | None,
    "head_dim": int | None,
    "hidden_act": str,
    "rope_theta": float,
    "rope_parameters": dict | None,
    "rope_scaling": dict | None,
    "rms_norm_eps": float,
    "tie_word_embeddings": bool,
    "attention_bias": bool,
    "mlp_bias": bool,
    "use_sliding_window": bool | None,
    "layer_types": list[str] | None,
    "max_position_embeddings": int,
    "bos_token_id": int | None,
    "eos_token_id": int | list[int] | None,
    "pad_token_id": int | None,
}
HF_REQUIRED_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def read_lm_config(
    path: str | pathlib.Path, allowed: Iterable[str], *, loader: str
) -> tuple[str, LMConfig]:
    """Reads and checks a folder's ``config.json`` for a Qwen2 / Llama model.

    Args:
        path: the checkpoint folder.
        allowed: accepted ``architectures`` names.
        loader: the calling loader's name (first word of the messages).

    Returns:
        ``(architecture name, config)``.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` does not exist.
        ValueError: invalid JSON, a missing (:data:`HF_REQUIRED_KEYS`) or wrongly typed
            (:data:`HF_CONFIG_TYPES`) key, or an unsupported architecture/config; every message
            names the folder, the file and the key.
    """

    def parse(raw: dict[str, Any]) -> tuple[str, LMConfig]:
        return check_architecture(raw, allowed), LMConfig.from_hf_dict(raw)

    return read_config(path, loader, parse, schema=HF_CONFIG_TYPES, required=HF_REQUIRED_KEYS)


def check_architecture(raw: dict[str, Any], allowed: Iterable[str]) -> str:
    """Returns the folder's architecture name, raising if it is not one of ``allowed``."""
    allowed = tuple(allowed)
    archs = raw.get("architectures") or [CAUSAL_LM_ARCHITECTURES.get(raw.get("model_type"), "")]
    if len(archs) != 1 or archs[0] not in allowed:
        raise ValueError(f"unsupported architectures {archs}; expected one of {allowed}")
    return archs[0]

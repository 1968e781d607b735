"""Decoder-only language model (Qwen2 / Llama layouts) in Flax NNX with a per-row KV cache.

The package is split by job; every name is importable from ``tts_jax.models.lm`` as before:

- :mod:`~tts_jax.models.lm.config`: :class:`LMConfig` and the transformers ``config.json``
  parsing and validation (:func:`read_lm_config`, :func:`check_architecture`);
- :mod:`~tts_jax.models.lm.modules`: the NNX layers (:class:`Linear`, :class:`Embedding`,
  :class:`RMSNorm`, :class:`Attention`, :class:`MLP`, :class:`DecoderLayer`), the
  :class:`Backbone` and the causal :class:`LM`, under transformers parameter names;
- :mod:`~tts_jax.models.lm.cache`: the per-row :class:`KVCache` (particle state, row axis
  first) and :func:`init_cache`;
- :mod:`~tts_jax.models.lm.generation`: the pure forward functions over a cache
  (:func:`hidden_states`, :func:`lm_logits`, :func:`forward`, :func:`decode_step`) and the jitted
  sampler :func:`generate`; ``sample_token`` is re-exported from :mod:`tts_jax.samplers.lm.state`;
- :mod:`~tts_jax.models.lm.checkpoint`: :func:`load_lm` / :func:`save_lm` and the generic
  :func:`load_weights` / :func:`save_weights` (transformers folders, safetensors only);
- :mod:`~tts_jax.models.lm.protocol`: :func:`language_model`, the adapter to the
  :class:`~tts_jax.models.base.LanguageModel` protocol, registered with
  :func:`~tts_jax.models.base.as_language_model` on import.

See docs/design.md ("Models we ship") and docs/algorithms.md (4.4, KV caches and particles).
"""

from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.models.checkpoint import (
    CheckpointError,
    read_config_file,
    require_files,
    safetensors_errors,
)
from tts_jax.models.lm import cache, checkpoint, config, modules, protocol
from tts_jax.models.lm.cache import KVCache, init_cache
from tts_jax.models.lm.checkpoint import load_lm, load_weights, save_lm, save_weights
from tts_jax.models.lm.config import (
    CAUSAL_LM_ARCHITECTURES,
    HF_CONFIG_TYPES,
    HF_REQUIRED_KEYS,
    SUPPORTED_MODEL_TYPES,
    LMConfig,
    check_architecture,
    read_lm_config,
)
from tts_jax.models.lm.generation import (
    GenerateOutput,
    decode_step,
    forward,
    generate,
    generate_program,
    hidden_states,
    lm_logits,
    sample_token,
)
from tts_jax.models.lm.modules import (
    INIT_STD,
    LM,
    MLP,
    Array,
    Attention,
    Backbone,
    DecoderLayer,
    Embedding,
    Linear,
    RMSNorm,
)
from tts_jax.models.lm.protocol import language_model

# Private helpers of the former single module ``models/lm.py``, still reachable from the package.
_MOE_KEYS = config._MOE_KEYS
_default_rope_theta = config._default_rope_theta
_eos_to_hf = config._eos_to_hf
_bcast = modules._bcast
_rope_tables = modules._rope_tables
_apply_rope = modules._apply_rope
_check_fits = cache._check_fits
_IGNORED_SUFFIXES = checkpoint._IGNORED_SUFFIXES
_read_tensors = checkpoint._read_tensors
_name = checkpoint._name
_init_cache = protocol._init_cache
_prefill = protocol._prefill

__all__ = [
    "CAUSAL_LM_ARCHITECTURES",
    "HF_CONFIG_TYPES",
    "HF_REQUIRED_KEYS",
    "INIT_STD",
    "LM",
    "MLP",
    "SUPPORTED_MODEL_TYPES",
    "Array",
    "Attention",
    "Backbone",
    "CheckpointError",
    "DecoderLayer",
    "Embedding",
    "GenerateOutput",
    "KVCache",
    "LMConfig",
    "LanguageModel",
    "Linear",
    "RMSNorm",
    "as_language_model",
    "check_architecture",
    "decode_step",
    "forward",
    "generate",
    "generate_program",
    "hidden_states",
    "init_cache",
    "language_model",
    "lm_logits",
    "load_lm",
    "load_weights",
    "read_config_file",
    "read_lm_config",
    "require_files",
    "safetensors_errors",
    "sample_token",
    "save_lm",
    "save_weights",
]

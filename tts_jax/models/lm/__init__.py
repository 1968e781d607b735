"""Decoder-only language model (Qwen2 / Llama layouts) in Flax NNX with a per-row KV cache."""

from tts_jax.models.lm.modules import *  # noqa: F403  (split by job in the next commit)
from tts_jax.models.lm.modules import _generate_jit  # noqa: F401

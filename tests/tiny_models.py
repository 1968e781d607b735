"""Tiny networks with NumPy-filled weights in any dtype (for the precision and chunking tests).

The weights are drawn in float32 from a seeded NumPy generator and cast to the module's dtype, so
the bfloat16 model of a seed is the float32 model of that seed rounded to bfloat16: their outputs
differ only by bfloat16 arithmetic. Filling from NumPy avoids jitted initialisation (seconds per
model on a loaded machine).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import lm
from tts_jax.models.dit import DiT, DiTConfig

TINY_DIT = DiTConfig(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=1,
    num_layers=1,
    sample_size=4,
    patch_size=2,
    num_embeds_ada_norm=3,
)


def filled(make, seed: int, scale: float = 0.2):
    """``make()``'s module (built abstractly) with N(0, scale^2) weights (norm scales around 1),
    drawn in float32 and cast to each parameter's dtype."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        is_norm_scale = "norm" in name and leaf.ndim == 1 and "'bias']" not in name
        base = 1.0 if is_norm_scale else 0.0
        value = (base + scale * rng.normal(size=leaf.shape)).astype(np.float32)
        return jnp.asarray(value).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def tiny_dit(dtype=jnp.float32, seed: int = 0) -> DiT:
    """A 1-layer DiT on ``1 x 4 x 4`` images with 3 classes (label 3 = null)."""
    return filled(lambda: DiT(TINY_DIT, dtype=dtype, rngs=nnx.Rngs(0)), seed, scale=0.1)


def lm_config(model_type: str = "qwen2", vocab: int = 5) -> lm.LMConfig:
    """A 2-layer grouped-query decoder (4 query heads, 2 key/value heads, head_dim 8)."""
    return lm.LMConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=model_type == "llama",
    )


@functools.cache
def tiny_lm(model_type: str = "qwen2", dtype=jnp.float32, vocab: int = 5, seed: int = 0) -> lm.LM:
    """A tiny Qwen2 (untied head) or Llama (tied embeddings) in ``dtype``."""
    config = lm_config(model_type, vocab)
    return filled(lambda: lm.LM(config, rngs=nnx.Rngs(0), dtype=dtype), seed, scale=0.3)

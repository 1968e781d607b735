"""The pure forward functions of the LM over a KV cache, and jitted sampling.

Modules are pytrees (Flax NNX), so :func:`forward`, :func:`decode_step` and friends take the model
as an ordinary argument inside ``jax.jit`` / ``lax.while_loop``: one compiled program serves any
weights and nothing is closed over. They are un-jitted library functions; :func:`generate` is the
jitted runner (``lax.while_loop`` over tokens, cache donated, temperature an array argument).
``sample_token`` is defined next to the samplers (:mod:`tts_jax.samplers.lm.state`) and
re-exported here. See docs/design.md, "Models we ship", and docs/algorithms.md, 4.4.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.lm.cache import KVCache, _check_fits, init_cache
from tts_jax.models.lm.modules import LM, Backbone, _rope_tables
from tts_jax.samplers.lm.state import sample_token  # defined next to the samplers

Array = jax.Array

__all__ = [
    "GenerateOutput",
    "decode_step",
    "forward",
    "generate",
    "hidden_states",
    "lm_logits",
    "sample_token",
]


def hidden_states(
    model: nnx.Module, tokens: Array, cache: KVCache, num_new: Array | None = None
) -> tuple[Array, KVCache]:
    """Final-norm hidden states of new tokens, written into the cache at each row's offset.

    Row ``i`` appends ``tokens[i, :num_new[i]]`` at positions ``cache.length[i] + t`` and each of
    them attends causally to the row's prefix; entries ``t >= num_new[i]`` are padding (their
    outputs are meaningless and nothing is written), so a row with ``num_new = 0`` is untouched.

    Args:
        model: any module with a :class:`Backbone` at ``model.model`` (:class:`LM`, reward models).
        tokens: ``int32[N, T]``.
        cache: :class:`KVCache` with ``N`` rows.
        num_new: ``int32[N]`` new tokens per row; ``None`` means all ``T``.

    Returns:
        ``(hidden [N, T, hidden_size], cache)`` with ``cache.length += num_new``.

    Raises:
        ValueError: ``T > max_len`` or mismatched shapes; when the lengths are concrete (outside
            ``jit``) also ``num_new`` outside ``[0, T]`` or ``length + num_new > max_len``. Under
            ``jit`` the caller guarantees capacity (overflowing writes would be dropped).
    """
    backbone: Backbone = model.model
    config = backbone.config
    n, t = tokens.shape
    num_new = jnp.full((n,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    _check_fits(cache, tokens, num_new)
    offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = cache.length[:, None] + offsets
    write_pos = jnp.where(offsets < num_new[:, None], positions, cache.max_len)
    mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]
    rope = _rope_tables(positions, config.head_dim, config.rope_theta)
    k_all, v_all = [], []
    x = backbone.embed_tokens(tokens)
    for layer, k_i, v_i in zip(backbone.layers, cache.k, cache.v, strict=True):
        attn, k_i, v_i = layer.self_attn(layer.input_layernorm(x), rope, k_i, v_i, write_pos, mask)
        k_all.append(k_i)
        v_all.append(v_i)
        x = x + attn
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.norm(x), KVCache(tuple(k_all), tuple(v_all), cache.length + num_new)


def lm_logits(model: LM, hidden: Array) -> Array:
    """Output projection ``hidden [..., hidden_size] -> float32 logits [..., vocab]``, accumulated
    in float32 whatever the model dtype (a bfloat16 logit of size 20 would be rounded to a
    multiple of 0.125, visible in the sampling probabilities)."""
    head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    return jnp.einsum("...h,vh->...v", hidden, head.weight[...], preferred_element_type=jnp.float32)


def forward(
    model: LM, tokens: Array, cache: KVCache, num_new: Array | None = None
) -> tuple[Array, KVCache]:
    """Logits of new tokens, reading and writing the cache (see :func:`hidden_states`).

    Args:
        model: :class:`LM`.
        tokens: ``int32[N, T]``.
        cache: :class:`KVCache` with ``N`` rows.
        num_new: ``int32[N]`` tokens to append per row (``None``: all ``T``; ``0``: untouched).

    Returns:
        ``(logits float32[N, T, vocab], cache)``.
    """
    hidden, cache = hidden_states(model, tokens, cache, num_new)
    return lm_logits(model, hidden), cache


def decode_step(
    model: LM, token: Array, cache: KVCache, active: Array | None = None
) -> tuple[Array, KVCache]:
    """Appends one token per active row and returns the next-token logits.

    Args:
        model: :class:`LM`.
        token: ``int32[N]``.
        cache: :class:`KVCache` with ``N`` rows.
        active: ``bool[N]``; inactive rows (e.g. finished particles) are left untouched.

    Returns:
        ``(logits float32[N, vocab], cache)`` (logits of inactive rows are meaningless).
    """
    num_new = None if active is None else jnp.asarray(active).astype(jnp.int32)
    logits, cache = forward(model, token[:, None], cache, num_new)
    return logits[:, 0], cache


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``int32[N, max_new_tokens]`` sampled tokens, ``pad_id`` after a row stopped.
        num_tokens: ``int32[N]`` tokens generated per row (a stop token counts).
        finished: ``bool[N]`` the row emitted a stop token.
        log_probs: ``float32[N, max_new_tokens]`` untempered model log-probability of each token
            (0 after a stop), e.g. for token-level importance weights.
        cache: holds the prompt and ``tokens[i, :num_tokens[i] - 1]``; the last sampled token of
            each row is *pending* (not yet written), so a continuation feeds it first.
    """

    tokens: Array
    num_tokens: Array
    finished: Array
    log_probs: Array
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("max_new_tokens",), donate_argnames=("cache",))
def generate_program(
    model: LM,
    prompt: Array,
    prompt_lengths: Array,
    cache: KVCache,
    key: Array,
    temperature: Array,
    stop_ids: Array,
    pad_id: Array,
    max_new_tokens: int,
) -> GenerateOutput:
    """The jitted program behind :func:`generate` (lower it to read its memory): prefill all but
    the last prompt token, then one ``lax.while_loop`` step per token."""
    n, p = prompt.shape
    if p > 1:
        _, cache = hidden_states(model, prompt[:, :-1], cache, prompt_lengths - 1)
    last = jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, prev, cache, done, num, out, logp = carry
        logits, cache = decode_step(model, prev, cache, ~done)
        tok = sample_token(jax.random.fold_in(key, i), logits, temperature)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]
        tok, lp = jnp.where(done, pad_id, tok), jnp.where(done, 0.0, lp)
        out, logp = out.at[:, i].set(tok), logp.at[:, i].set(lp)
        num = num + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
        return i + 1, tok, cache, done, num, out, logp

    init = (
        jnp.int32(0),
        last,
        cache,
        jnp.zeros((n,), bool),
        jnp.zeros((n,), jnp.int32),
        jnp.full((n, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((n, max_new_tokens), jnp.float32),
    )
    _, _, cache, done, num, out, logp = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(out, num, done, logp, cache)


def generate(
    model: LM,
    prompt: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature: float | Array = 1.0,
    eos_id: int | Sequence[int] | None = None,
    prompt_lengths: Array | None = None,
    cache: KVCache | None = None,
    pad_id: int = 0,
    cache_dtype: Any = jnp.float32,
) -> GenerateOutput:
    """Samples up to ``max_new_tokens`` per row in one jitted ``lax.while_loop``.

    The loop stops early once every row emitted a stop token. ``temperature`` (scalar or ``[N]``,
    0 = greedy), ``eos_id`` values, ``pad_id`` and ``key`` are traced, so changing them does not
    recompile; ``max_new_tokens`` and shapes are static. The cache is donated.

    Args:
        model: :class:`LM`.
        prompt: ``int32[N, P]``, right-padded when ``prompt_lengths`` is given.
        key: PRNG key (``fold_in(key, step)`` per token).
        max_new_tokens: static budget per row.
        temperature: sampling temperature, scalar or ``[N]``.
        eos_id: stop token id(s); ``None`` never stops early.
        prompt_lengths: ``int32[N]`` (each ``>= 1``); ``None`` means ``P``.
        cache: existing cache to continue (the prompt is appended at each row's offset; the
            caller must not reuse it after the call, it is donated); ``None`` allocates
            ``max_len = P + max_new_tokens``.
        pad_id: filler after a row stops.
        cache_dtype: dtype of a newly allocated cache.

    Returns:
        :class:`GenerateOutput`.

    Note:
        For ``N`` samples of one prompt, prefill a 1-row cache with :func:`forward` on all but
        the last prompt token, gather it to ``N`` rows (``x[jnp.zeros(N, int)]``) and call
        ``generate`` with the last token as a 1-token prompt: the prompt is processed once.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be int32[N, P] with P >= 1, got shape {prompt.shape}")
    n, p = prompt.shape
    lengths = np.full((n,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (n,) or np.any(lengths < 1) or np.any(lengths > p):
        raise ValueError(
            f"prompt_lengths must be ({n},) values in [1, {p}] (empty prompts have "
            f"no next-token distribution), got {lengths}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache is None:
        cache = init_cache(model.model.config, n, p + max_new_tokens, cache_dtype)
    needed = np.asarray(cache.length) + lengths - 1 + max_new_tokens
    if np.any(needed > cache.max_len):
        raise ValueError(
            f"prompt + max_new_tokens needs {needed.max()} cache slots, the cache "
            f"has max_len={cache.max_len}"
        )
    stop = [-1] if eos_id is None else list(np.atleast_1d(eos_id))
    return generate_program(
        model,
        prompt,
        jnp.asarray(lengths, jnp.int32),
        cache,
        key,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(stop, jnp.int32),
        jnp.asarray(pad_id, jnp.int32),
        max_new_tokens=max_new_tokens,
    )

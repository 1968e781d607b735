"""Exact completion distributions of tiny LMs by brute-force enumeration (test references).

DESIGN.md "Models we ship": tiny enumerable LMs are how the LM samplers are proven correct. For a
vocabulary of ``V`` tokens and a budget of ``L`` new tokens, every completion is a string that
ends with its first stop token or fills the budget; :func:`enumerate_completions` scores all
``V^L`` strings in one batched forward and returns the distinct completions with their exact
log-probabilities, against which weighted particles and ``log Z`` estimates are compared.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models import lm

MAX_ENUMERATED = 100_000
_forward = jax.jit(lm.forward)


def enumerate_completions(model: lm.LM, prompt, max_new_tokens: int,
                          stop_ids=()) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every completion of ``prompt`` and its exact log-probability under ``model``.

    Args:
        model: :class:`~tts_jax.models.lm.LM` with a small vocabulary ``V``.
        prompt: ``int[P]``.
        max_new_tokens: L.
        stop_ids: tokens that end a completion (kept as its last token).

    Returns:
        ``(completions, log_probs float64[C])``: the distinct completions (tuples, stop token
        included) and their log-probabilities (they sum to one).

    Raises:
        ValueError: ``V^L`` above :data:`MAX_ENUMERATED`.
    """
    vocab = model.config.vocab_size
    if vocab**max_new_tokens > MAX_ENUMERATED:
        raise ValueError(f"{vocab}^{max_new_tokens} strings are too many to enumerate")
    prompt = np.asarray(prompt, np.int32)
    strings = np.array(list(itertools.product(range(vocab), repeat=max_new_tokens)), np.int32)
    full = np.concatenate([np.tile(prompt, (len(strings), 1)), strings], axis=1)
    cache = lm.init_cache(model.config, full.shape[0], full.shape[1])
    logits, _ = _forward(model, jnp.asarray(full), cache)
    # Position P - 1 + t predicts new token t.
    logp = jax.nn.log_softmax(logits[:, len(prompt) - 1: -1], axis=-1)
    logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(strings)[..., None], axis=-1)[..., 0],
                      np.float64)
    stops = np.isin(strings, np.asarray(stop_ids, np.int32))
    # Length of each string's completion: up to and including its first stop token.
    lengths = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, max_new_tokens)
    completions, log_probs = {}, []
    for s, n, lp in zip(strings, lengths, logp, strict=True):
        c = tuple(int(t) for t in s[:n])
        if c not in completions:
            completions[c] = len(log_probs)
            log_probs.append(lp[:n].sum())
    return list(completions), np.asarray(log_probs)


"""Exact completion distributions of tiny LMs by brute-force enumeration (test references).

docs/design.md "Models we ship": tiny enumerable LMs are how the LM samplers are proven correct.
For a vocabulary of ``V`` tokens and a budget of ``L`` new tokens, every completion is a string that
ends with its first stop token or fills the budget; :func:`enumerate_completions` scores all
``V^L`` strings in one batch (a prefill and ``L`` decode steps of the
:class:`~tts_jax.models.base.LanguageModel` protocol, so any model implementing it can be checked)
and returns the distinct completions with their exact log-probabilities, against which weighted
particles and ``log Z`` estimates are compared.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models.base import LanguageModel, as_language_model

MAX_ENUMERATED = 100_000


@jax.jit
def _token_log_probs(model: LanguageModel, prompt: jax.Array, strings: jax.Array) -> jax.Array:
    """``float32[S, L]``: ``log p(strings[s, t] | prompt, strings[s, :t])`` for every string."""
    model = as_language_model(model)
    count, length = strings.shape
    cache = model.init_cache(count, prompt.shape[0] + length)
    logits, cache = model.prefill(
        jnp.tile(prompt, (count, 1)), cache, jnp.full((count,), prompt.shape[0], jnp.int32)
    )
    feed = jnp.ones((count,), bool)
    columns = []
    for t in range(length):
        token = strings[:, t]
        logp = jax.nn.log_softmax(logits, axis=-1)
        columns.append(jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0])
        if t + 1 < length:
            logits, cache = model.decode(token, cache, feed)
    return jnp.stack(columns, axis=1)


def enumerate_completions(
    model: LanguageModel, prompt, max_new_tokens: int, stop_ids=()
) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every completion of ``prompt`` and its exact log-probability under ``model``.

    Args:
        model: a :class:`~tts_jax.models.base.LanguageModel` (or a model with a registered
            adapter, e.g. :class:`~tts_jax.models.lm.LM`) with a small vocabulary ``V``.
        prompt: ``int[P]``.
        max_new_tokens: L.
        stop_ids: tokens that end a completion (kept as its last token).

    Returns:
        ``(completions, log_probs float64[C])``: the distinct completions (tuples, stop token
        included) and their log-probabilities (they sum to one).

    Raises:
        ValueError: ``V^L`` above :data:`MAX_ENUMERATED`.
    """
    vocab = as_language_model(model).vocab_size
    if vocab**max_new_tokens > MAX_ENUMERATED:
        raise ValueError(f"{vocab}^{max_new_tokens} strings are too many to enumerate")
    prompt = np.asarray(prompt, np.int32)
    strings = np.array(list(itertools.product(range(vocab), repeat=max_new_tokens)), np.int32)
    logp = np.asarray(
        _token_log_probs(model, jnp.asarray(prompt), jnp.asarray(strings)), np.float64
    )
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

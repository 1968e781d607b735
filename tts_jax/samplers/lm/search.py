"""Search baselines for LM steering with the same interface and budget accounting as
:mod:`tts_jax.samplers.lm.particle_filter` (docs/algorithms.md 4.3).

* :func:`best_of_n`: ``N`` independent completions, scored once at the end by an ORM (use
  ``aggregation="model"``) or the aggregated PRM score; pick with ``argmax``
  (:func:`~tts_jax.samplers.lm.answers.select`), :func:`weighted_best_of_n` (sum the scores of equal
  answers) or :func:`majority_vote` (self-consistency; Wang et al. 2023).
* :func:`beam_search` over steps: every step, keep the top ``N / beam_width`` partial solutions by
  PRM score and expand each ``beam_width`` times (optional duplicate filtering).
* :func:`dvts`, diverse verifier tree search (Beeching et al. 2024, "Scaling test-time compute
  with open models"): ``N / beam_width`` independent subtrees, each a greedy beam of width 1
  expanded ``beam_width`` times.

All three are one grouped top-k selection after each step: the ``N`` particles form ``G``
groups of ``N / G``; each group keeps its ``k`` best partial solutions and copies each
``N / (G k)`` times (one gather of the whole :class:`~tts_jax.samplers.lm.state.LMState`,
KV cache included). Best-of-N is ``G = N, k = 1`` without intermediate scoring. Finished
particles stay in the pool with their final score (as in particle filtering); with
``dedup=True`` identical completions in a group compete only once. No selection happens after the
last step or once every particle is done. A NaN score is never selected while a finite one
exists, and is an error after the run unless ``nan_policy="drop"``.

Budget (``Result.budget``): tokens sampled, LM forwards per row, batched LM calls, scorer
evaluations per particle, the same units as the particle methods.

**Kernel** (:mod:`tts_jax.samplers.base`, issue 16): :func:`search_sampler` (memoized, static:
particle, step and token counts, scorer, aggregation) with :class:`SearchParams` (model,
prompt, scorer params, decoding config and the method's plan ``num_groups`` / ``keep`` /
``score_steps`` / ``dedup``, all data) and :func:`check_search_params`;
``jax.jit(tts_jax.samplers.run, static_argnames="sampler")`` runs it. The three functions
below are host checks, then ``run_with_keys(*search_keys(key, sampler), sampler, params)``
jitted (their former key layout: the same bits), then the NaN policy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.particles import gather
from tts_jax.rewards.base import Aggregation, StepScorer, as_aggregation, as_step_scorer
from tts_jax.samplers.base import Sampler, run_with_keys
from tts_jax.samplers.lm import answers as answers_module
from tts_jax.samplers.lm.answers import select
from tts_jax.samplers.lm.checks import check_budget, check_nan, check_prompt, check_prompt_length
from tts_jax.samplers.lm.scoring import (
    final_scores,
    step_scores,
    with_scorer_state,
)
from tts_jax.samplers.lm.state import (
    DecodeConfig,
    add_budget,
    decode_config,
    generate_step,
    init_state,
    make_result,
    step_separators,
)
from tts_jax.samplers.result import Result
from tts_jax.smc import step_keys_for

Array = jax.Array


def _group_size(n: int, num_groups: Array) -> Array:
    return n // jnp.maximum(num_groups, 1)


def duplicates(tokens: Array, lengths: Array, num_groups: Array) -> Array:
    """``bool[N]``: the completion equals an earlier one of the same group.

    Args:
        tokens: ``int32[N, L]``.
        lengths: ``int32[N]``.
        num_groups: int32 scalar G (groups are contiguous blocks of ``N / G``).
    """
    n = tokens.shape[0]
    same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
    same &= lengths[:, None] == lengths[None, :]
    group = jnp.arange(n) // _group_size(n, num_groups)
    earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
    return jnp.any(same & earlier & (group[:, None] == group[None, :]), axis=1)


def grouped_top_k(scores: Array, num_groups: Array, keep: Array) -> Array:
    """Ancestors ``int32[N]``: each group's ``keep`` best particles, each copied
    ``N / (G keep)`` times (ties keep the lower index; NaN ranks last). ``G`` and ``keep`` are
    traced int32 scalars, so beam search, DVTS and best-of-N share one compiled program.

    Args:
        scores: ``float32[N]``.
        num_groups: G, dividing N.
        keep: k per group, dividing ``N / G``.
    """
    n = scores.shape[0]
    size = _group_size(n, num_groups)
    slot = jnp.arange(n, dtype=jnp.int32)
    group = slot // size
    ranked = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    order = jnp.lexsort((-ranked, group)).astype(jnp.int32)  # by group, then best first
    copies = size // jnp.maximum(keep, 1)
    return order[group * size + (slot % size) // copies]


class SearchParams(NamedTuple):
    """Everything array-valued the searches need (a pytree: a jit argument, never static). The
    method is data (its grouping plan), so best-of-N, beam search and DVTS of one configuration
    share one compiled program.

    Attributes:
        model: :class:`~tts_jax.models.base.LanguageModel` or a model with a registered
            adapter.
        prompt: ``int32[P]`` prompt tokens, right-padded.
        prompt_length: int32 scalar, the real tokens of ``prompt``.
        scorer_params: parameters of the sampler's scorer (e.g. the PRM module).
        decode: :class:`~tts_jax.samplers.lm.state.DecodeConfig` (``temperature``, ``sep_ids``,
            ``stop_ids int32[S]``, ``pad_id``).
        num_groups: int32 scalar G, dividing N (best-of-N: N; beam search: 1; DVTS:
            ``N / beam_width``).
        keep: int32 scalar k kept per group, dividing ``N / G``.
        score_steps: bool scalar: score and select after each step (else score once at the
            end, best-of-N).
        dedup: bool scalar: identical completions in a group compete only once.
    """

    model: Any
    prompt: Array
    prompt_length: Array
    scorer_params: Any
    decode: DecodeConfig
    num_groups: Array
    keep: Array
    score_steps: Array
    dedup: Array


def make_search_params(
    model,
    prompt,
    scorer_params,
    *,
    num_groups,
    keep,
    score_steps,
    dedup=False,
    temperature=0.8,
    sep_id=None,
    sep_ids=None,
    stop_ids=None,
    pad_id=0,
    prompt_length=None,
) -> SearchParams:
    """:class:`SearchParams` from Python or array values (no checks: see
    :func:`check_search_params`); ``prompt_length=None``: all of ``prompt``."""
    prompt = jnp.asarray(prompt, jnp.int32)
    length = prompt.shape[0] if prompt_length is None else prompt_length
    return SearchParams(
        model,
        prompt,
        jnp.asarray(length, jnp.int32),
        scorer_params,
        decode_config(temperature, step_separators(sep_id, sep_ids), stop_ids, pad_id),
        jnp.asarray(num_groups, jnp.int32),
        jnp.asarray(keep, jnp.int32),
        jnp.asarray(score_steps),
        jnp.asarray(dedup),
    )


def check_search_params(
    params: SearchParams, sampler: Sampler, num_particles: int, method: str = "search"
) -> None:
    """Host-side checks of ``params`` (values only when concrete).

    Raises:
        ValueError: a bad prompt or prompt length, a plan whose ``G`` does not divide
            ``num_particles`` or whose ``k`` does not divide ``N / G``.
    """
    prompt = check_prompt(params.prompt)
    if not isinstance(params.prompt_length, jax.core.Tracer):
        check_prompt_length(prompt, params.prompt_length)
    if not any(isinstance(v, jax.core.Tracer) for v in (params.num_groups, params.keep)):
        g, k = int(params.num_groups), int(params.keep)
        if g < 1 or num_particles % g or k < 1 or (num_particles // g) % k:
            raise ValueError(
                f"{method}: num_groups={g} must divide num_particles="
                f"{num_particles} and keep={k} must divide num_particles / "
                "num_groups"
            )


class SearchCarry(NamedTuple):
    """State of :func:`search_sampler`: the particles (``LMState``, ``N`` rows, KV cache
    included) and the int32 number of steps taken."""

    particles: Any
    step: Array


def search_sampler(
    num_particles: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    scorer: StepScorer | Any,
    aggregation: str | Aggregation = "last",
) -> Sampler:
    """Best-of-N, beam search and DVTS (docs/algorithms.md 4.3; DVTS: Beeching et al. 2024) as
    one :class:`~tts_jax.samplers.base.Sampler` of static configuration (memoized); the method
    is the plan in :class:`SearchParams`.

    Each of the ``max_steps`` steps (a ``lax.scan``, one key per step) generates one step of
    every particle, scores it when ``score_steps`` and, before the last step, keeps each
    group's best (:func:`grouped_top_k`, one gather of the state). ``info``: ``ancestors
    int32[K, N]``, ``scores float32[K, N]`` (before selection), ``num_nan``. The result is the
    :class:`~tts_jax.samplers.result.Result` of :func:`best_of_n` / :func:`beam_search` /
    :func:`dvts`, which run it with :func:`search_keys`.

    Raises:
        ValueError: an empty budget, an unknown aggregation.
    """
    check_budget(num_particles, max_new_tokens, max_steps, max_step_tokens)
    aggregation = as_aggregation(aggregation)
    return _search_sampler(
        int(num_particles),
        int(max_steps),
        int(max_step_tokens),
        int(max_new_tokens),
        scorer,
        aggregation,
    )


@functools.cache
def _search_sampler(n, max_steps, max_step_tokens, length, scorer, aggregation) -> Sampler:
    identity = jnp.arange(n, dtype=jnp.int32)

    def init(key, params):
        model, step_scorer = as_language_model(params.model), as_step_scorer(scorer)
        state = init_state(
            model,
            params.prompt,
            n,
            length,
            params.decode.pad_id,
            prompt_length=params.prompt_length,
        )
        state = with_scorer_state(
            step_scorer, params.scorer_params, state, params.prompt, params.prompt_length
        )
        return SearchCarry(state, jnp.int32(0))

    def step(key, carry, params):
        model, step_scorer = as_language_model(params.model), as_step_scorer(scorer)
        s, k = carry
        all_done = jnp.all(s.done)
        was_done = s.done
        s = generate_step(model, s, key, params.decode, max_step_tokens)
        scoring = params.score_steps & ~all_done
        fresh, s = step_scores(
            step_scorer, params.scorer_params, s, max_step_tokens, aggregation, scoring
        )
        r = jnp.where(was_done, s.score, fresh)
        s = s._replace(
            score=r,
            budget=add_budget(s.budget, prm_calls=jnp.where(scoring, jnp.sum(~was_done), 0)),
        )
        dup = params.dedup & duplicates(s.tokens, s.length, params.num_groups)
        ranked = jnp.where(dup, -jnp.inf, r)
        select_now = scoring & (k < max_steps - 1)
        ancestors = jnp.where(
            select_now, grouped_top_k(ranked, params.num_groups, params.keep), identity
        )
        return SearchCarry(gather(s, ancestors), k + 1), {"ancestors": ancestors, "scores": r}

    def finalize(carry, info, params):
        final = carry.particles
        final_only = ~params.score_steps
        final = final._replace(
            score=final_scores(
                as_step_scorer(scorer), params.scorer_params, final, aggregation, final_only
            ),
            budget=add_budget(final.budget, prm_calls=jnp.where(final_only, n, 0)),
        )
        info = dict(info)
        info["num_nan"] = jnp.sum(jnp.isnan(final.score)) + jnp.sum(jnp.isnan(info["scores"]))
        lw = jnp.full((n,), -jnp.log(n), jnp.float32)
        best = jnp.argmax(jnp.where(jnp.isnan(final.score), -jnp.inf, final.score))
        return make_result(
            final, lw, best.astype(jnp.int32), jnp.float32(jnp.nan), jnp.asarray(False), info
        )

    return Sampler(init, step, finalize, max_steps)


def search_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """``(init_key, step_keys Key[K])`` of the searches' key layout (step ``k``:
    ``fold_in(key, k)``; ``init`` draws nothing): with them, ``jax.jit(run_with_keys,
    static_argnames="sampler")(*search_keys(key, sampler), sampler, params)`` is
    :func:`beam_search` (etc.) bit for bit, without its host-side checks."""
    return key, step_keys_for(key, sampler.num_steps)


_run_with_keys = jax.jit(run_with_keys, static_argnames="sampler")


def _search(
    key,
    model,
    prompt,
    scorer,
    scorer_params,
    *,
    num_particles,
    num_groups,
    keep,
    score_steps,
    dedup,
    max_steps,
    max_step_tokens,
    max_new_tokens,
    temperature,
    sep_id,
    sep_ids,
    stop_ids,
    pad_id,
    aggregation,
    nan_policy,
    method,
    prompt_length,
):
    sampler = search_sampler(
        num_particles, max_steps, max_step_tokens, max_new_tokens, scorer, aggregation
    )
    prompt = check_prompt(prompt)
    length = check_prompt_length(prompt, prompt_length)
    params = make_search_params(
        model,
        prompt,
        scorer_params,
        num_groups=num_groups,
        keep=keep,
        score_steps=score_steps,
        dedup=dedup,
        temperature=temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        prompt_length=length,
    )
    check_search_params(params, sampler, num_particles, method)
    result = _run_with_keys(*search_keys(key, sampler), sampler, params)
    check_nan(int(result.info.num_nan), method, nan_policy)
    return result


def _check_beam_width(num_particles: int, beam_width: int) -> None:
    if beam_width < 1 or num_particles % beam_width:
        raise ValueError(
            f"beam_width must be >= 1 and divide num_particles, got beam_width="
            f"{beam_width}, num_particles={num_particles}"
        )


def best_of_n(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """``N`` independent completions scored once at the end (one scorer call per particle).

    Arguments as :func:`tts_jax.samplers.lm.particle_filter.particle_filter` (``prompt_length``
    included);
    ``aggregation="model"`` makes the scorer an outcome reward model (only the final position is
    scored).

    Returns:
        :class:`~tts_jax.samplers.result.Result` with uniform weights; ``best`` is the
        argmax of the final scores.
    """
    return _search(
        key,
        model,
        prompt,
        scorer,
        scorer_params,
        num_particles=num_particles,
        num_groups=num_particles,
        keep=1,
        score_steps=False,
        dedup=False,
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        aggregation=aggregation,
        nan_policy=nan_policy,
        method="best_of_n",
        prompt_length=prompt_length,
    )


def beam_search(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    beam_width: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    dedup: bool = False,
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """Step-level beam search with a PRM: keep the top ``N / beam_width``, expand each
    ``beam_width`` times (``info.extra["ancestors"]``, ``info.extra["scores"]``: per step, before
    selection).

    Raises:
        ValueError: ``beam_width`` not dividing ``num_particles``, or as :func:`best_of_n`.
    """
    _check_beam_width(num_particles, beam_width)
    return _search(
        key,
        model,
        prompt,
        scorer,
        scorer_params,
        num_particles=num_particles,
        num_groups=1,
        keep=num_particles // beam_width,
        score_steps=True,
        dedup=dedup,
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        aggregation=aggregation,
        nan_policy=nan_policy,
        method="beam_search",
        prompt_length=prompt_length,
    )


def dvts(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    beam_width: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    dedup: bool = False,
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """Diverse verifier tree search: ``N / beam_width`` independent subtrees (contiguous blocks
    of ``beam_width`` particles), each keeping its best partial solution and expanding it
    ``beam_width`` times.

    Raises:
        ValueError: ``beam_width`` not dividing ``num_particles``, or as :func:`best_of_n`.
    """
    _check_beam_width(num_particles, beam_width)
    return _search(
        key,
        model,
        prompt,
        scorer,
        scorer_params,
        num_particles=num_particles,
        num_groups=num_particles // beam_width,
        keep=1,
        score_steps=True,
        dedup=dedup,
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        aggregation=aggregation,
        nan_policy=nan_policy,
        method="dvts",
        prompt_length=prompt_length,
    )


def weighted_best_of_n(result: Result, answers: Sequence[Any]) -> int:
    """Index of a best-scoring particle of the answer with the largest summed score."""
    return select(result, answers_module.score_vote, answers)


def majority_vote(result: Result, answers: Sequence[Any]) -> int:
    """Index of a best-scoring particle of the most frequent answer (self-consistency)."""
    return select(result, answers_module.majority_vote, answers)

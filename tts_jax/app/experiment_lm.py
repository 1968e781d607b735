"""LM steering runs and resumable scaling sweeps on the arithmetic task (the CLI layer).

A run is (method, particle budget ``N``, seed, held-out problem). :data:`LM_METHODS` maps a method
name to an adapter that spends ``N`` particles with a library sampler
(:mod:`tts_jax.samplers.lm.search`, :mod:`tts_jax.samplers.lm.particle_filter`) and picks the
final answer:

- ``greedy``: one temperature-0 completion (independent of ``N``: recorded with budget 1);
- ``majority``: self-consistency, the most frequent answer of ``N`` samples (no scorer);
- ``bon``: best-of-``N``, the sample with the highest final score (the PRM read at the EOS after
  the answer line is the outcome reward: ``aggregation="last"`` is both ORM and last-step PRM);
- ``wbon``: weighted best-of-``N``, the answer with the largest summed final score;
- ``beam``: step-level beam search, beam width ``gcd(4, N)`` (4, or ``N`` when smaller);
- ``pf``: step-level particle filtering (Puri et al. 2025, "A Probabilistic Inference Approach to
  Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods"), final answer the
  highest-scored particle;
- ``epf``: entropic particle filtering (annealed weights, systematic resampling);
- ``gibbs``: particle Gibbs, 2 sweeps of ``N / 2`` particles (needs ``N >= 4``).

All methods share the same sampling temperature, step definition (one line; the ``"\\n"`` token
ends a step, EOS ends the solution) and the same PRNG key per (seed, problem), so methods that
draw independent samples (majority, bon, wbon) see the very same samples.

Scorers: ``prm`` is the embedded process reward model (``tts_jax/assets/arith-prm``); ``oracle``
is the exact programmatic checker used as a PRM behind the host boundary
(:func:`~tts_jax.samplers.lm.scoring.host_scorer`): a step scores :data:`ORACLE_HIT` if the
solution prefix up to it is still correct and :data:`ORACLE_MISS` otherwise. The scores are
smoothed away from 0 / 1 so that the log-odds weights of particle filtering stay finite and a
particle filter whose particles are all wrong still resamples by weight instead of dividing by
zero; with ``T_softmax = 1`` a correct prefix outweighs a wrong one by ``(0.99 / 0.01)^2 ~ 1e4``.

Prompts are right-padded to :data:`~tts_jax.app.tasks.arith_models.PROMPT_WIDTH` and passed with
their length, so every problem of a given ``N`` and method shares one compiled program.

Each run gives a JSON-able record (method, budget, seed, problem, scorer, correct, answer, tokens,
LM calls, PRM calls, wall time, ...); :func:`sweep_lm` appends one line per finished run to
``runs.jsonl`` and skips finished runs when restarted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import diagnostics
from tts_jax.app import runs, sweeps
from tts_jax.app.tasks.arith_models import (
    MAX_NEW_TOKENS,
    N_EVAL_PROBLEMS,
    PROMPT_WIDTH,
    encode_prompts,
    eval_problems,
    load_arith_policy,
    load_arith_prm,
)
from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer
from tts_jax.app.tasks.arithmetic import (
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    Problem,
    check_solution_prefix,
    extract_answer,
    is_correct,
    is_valid_solution,
    split_steps,
)
from tts_jax.models.lm import LM
from tts_jax.models.lm_reward import RewardModel, cached_prm_scorer
from tts_jax.samplers.lm import particle_filter
from tts_jax.samplers.lm import search as lm_search
from tts_jax.samplers.lm.answers import extract_answers
from tts_jax.samplers.lm.scoring import StepScorer, host_scorer
from tts_jax.samplers.result import Result

SCORERS = ("prm", "oracle")
ORACLE_HIT = 0.99
ORACLE_MISS = 0.01
BEAM_WIDTH = 4
GIBBS_SWEEPS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMRunConfig:
    """One LM steering run over a range of held-out arithmetic problems.

    Attributes:
        method: a name in :data:`LM_METHODS`.
        num_particles: N, the budget (samples / particles / beams).
        problems: half-open range ``(start, stop)`` of held-out problem indices
            (:func:`tts_jax.app.tasks.arith_models.eval_problems`).
        seed: PRNG seed (problem ``i`` uses ``fold_in(key(seed), i)``).
        temperature: LM sampling temperature (0.8 as in Puri et al. 2025).
        softmax_temperature: ``T_softmax`` of the particle weights (pf, epf, gibbs).
        scorer: ``prm`` (the embedded PRM) or ``oracle`` (the exact checker, see module doc).
        max_steps: steps (lines) per solution; particles still running after them are unfinished.
        max_step_tokens: token limit of one step.
        max_new_tokens: token buffer of a completion.
    """

    method: str = "pf"
    num_particles: int = 8
    problems: tuple[int, int] = (0, 1)
    seed: int = 0
    temperature: float = 0.8
    softmax_temperature: float = 1.0
    scorer: str = "prm"
    max_steps: int = 8
    max_step_tokens: int = 16
    max_new_tokens: int = MAX_NEW_TOKENS

    def __post_init__(self):
        if self.method not in LM_METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(LM_METHODS)}")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; known: {SCORERS}")
        if self.num_particles < 1:
            raise ValueError(f"num_particles (the budget N) must be >= 1, got {self.num_particles}")
        if self.method == "gibbs" and self.num_particles < 2 * GIBBS_SWEEPS:
            raise ValueError(
                f"gibbs runs {GIBBS_SWEEPS} sweeps of at least 2 particles: "
                f"num_particles must be >= {2 * GIBBS_SWEEPS}, "
                f"got {self.num_particles}"
            )
        start, stop = self.problems
        if not 0 <= start < stop <= N_EVAL_PROBLEMS:
            raise ValueError(
                f"problems must be a range (start, stop) with 0 <= start < stop <= "
                f"{N_EVAL_PROBLEMS}, got {self.problems}"
            )
        sizes = {
            "max_steps": self.max_steps,
            "max_step_tokens": self.max_step_tokens,
            "max_new_tokens": self.max_new_tokens,
        }
        if min(sizes.values()) < 1:
            raise ValueError(f"every size must be >= 1, got {sizes}")
        temps = (self.temperature, self.softmax_temperature)
        if not np.isfinite(temps).all() or self.temperature < 0 or self.softmax_temperature <= 0:
            raise ValueError(
                f"need temperature >= 0 and softmax_temperature > 0, got "
                f"{self.temperature}, {self.softmax_temperature}"
            )


@dataclasses.dataclass(frozen=True)
class LMBundle:
    """What a run uses: the policy, its tokenizer, the PRM (if loaded) and the oracle scorer.

    Build it once per process (:func:`load_lm_bundle`): the samplers compile per scorer object.
    """

    policy: LM
    tokenizer: ArithTokenizer
    prm: RewardModel | None
    oracle: StepScorer
    problems: tuple[Problem, ...]


def load_lm_bundle(with_prm: bool = True) -> LMBundle:
    """Load the embedded arithmetic policy (and PRM) with the held-out problems.

    Args:
        with_prm: also load ``assets/arith-prm`` (needed by ``scorer="prm"``).

    Raises:
        FileNotFoundError: a checkpoint is missing (naming its training script).
    """
    _, policy, tokenizer = load_arith_policy()
    prm = load_arith_prm()[1] if with_prm else None
    return make_bundle(policy, tokenizer, prm)


def make_bundle(policy: LM, tokenizer: ArithTokenizer, prm: RewardModel | None) -> LMBundle:
    """A bundle from given models (e.g. small random ones in tests)."""
    oracle = host_scorer(functools.partial(oracle_step_scores, tokenizer))
    return LMBundle(policy, tokenizer, prm, oracle, tuple(eval_problems(N_EVAL_PROBLEMS)))


# --------------------------------------------------------------------------- scorers


def problem_from_prompt(prompt: str) -> Problem:
    """Rebuild a problem from its prompt text ``"Q: <expression>=?\\n"``.

    Raises:
        ValueError: the text is not a task prompt.
    """
    body = prompt.strip().removeprefix(PROMPT_PREFIX.strip()).removesuffix(PROMPT_SUFFIX.strip())
    numbers = [int(n) for n in re.findall(r"\d+", body)]
    ops = re.findall(r"[+\-*]", body)
    if not numbers or len(ops) != len(numbers) - 1:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    problem = Problem(numbers[0], tuple(zip(ops, numbers[1:], strict=True)))
    if problem.prompt.strip() != prompt.strip():
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return problem


def _prefix_correct(problem: Problem, text: str) -> bool:
    """Every step line of ``text`` (a completion up to a step end) is correct."""
    flags = check_solution_prefix(problem, text)
    return bool(flags) and len(flags) == len(split_steps(text)) and flags[-1]


def oracle_step_scores(
    tokenizer: ArithTokenizer, tokens: np.ndarray, step_ends: np.ndarray
) -> np.ndarray:
    """The exact checker as a PRM (host function for :func:`host_scorer`).

    The problem is read back from each row's prompt (the text up to its first ``"\\n"``), so the
    scorer is a pure function of the token rows and one compiled program serves every problem.

    Args:
        tokenizer: the task tokenizer.
        tokens: ``int[N, T]`` prompt + completion rows.
        step_ends: ``bool[N, T]`` step ends to score.

    Returns:
        ``float32[N, T]``: :data:`ORACLE_HIT` at step ends whose solution prefix is correct,
        :data:`ORACLE_MISS` at the others, 0 elsewhere.
    """
    tokens, step_ends = np.asarray(tokens), np.asarray(step_ends)
    out = np.zeros(tokens.shape, np.float32)
    for i, (row, ends) in enumerate(zip(tokens, step_ends, strict=True)):
        positions = np.flatnonzero(ends)
        if positions.size == 0:
            continue
        start = int(np.argmax(row == tokenizer.delimiter_id)) + 1
        problem = problem_from_prompt(tokenizer.decode(row[:start]))
        for j in positions:
            ok = _prefix_correct(problem, tokenizer.decode(row[start : j + 1]))
            out[i, j] = ORACLE_HIT if ok else ORACLE_MISS
    return out


def constant_scorer(_params: Any, tokens: jax.Array, step_ends: jax.Array) -> jax.Array:
    """A scorer that looks at nothing (0.5 at every step end), for methods without a verifier."""
    return jnp.where(step_ends, 0.5, 0.0).astype(jnp.float32)


def scorer_of(bundle: LMBundle, name: str) -> tuple[StepScorer, Any]:
    """``(scorer, scorer_params)`` for a scorer name.

    Raises:
        ValueError: ``prm`` requested but the bundle has no PRM.
    """
    if name == "oracle":
        return bundle.oracle, None
    if bundle.prm is None:
        raise ValueError(
            "scorer 'prm' needs the arithmetic PRM: train it with "
            "`tts-jax train arith-prm --install` or use scorer='oracle'"
        )
    return cached_prm_scorer, bundle.prm  # particle filters feed its KV cache step by step


# --------------------------------------------------------------------------- methods


class Prompt(NamedTuple):
    """A prompt right-padded to :data:`PROMPT_WIDTH` and its real length."""

    ids: np.ndarray
    length: int


class LMMethod(NamedTuple):
    """A registry entry.

    Attributes:
        run: ``(key, bundle, config, prompt) -> (Result, chosen particle index)``.
        uses_scorer: the method consults the scorer (else it is recorded with scorer "none").
        budget_independent: the method ignores ``N`` (recorded with budget 1).
    """

    run: Callable[[jax.Array, LMBundle, LMRunConfig, Prompt], tuple[Result, int]]
    uses_scorer: bool
    budget_independent: bool = False


def _sampling_kwargs(bundle: LMBundle, config: LMRunConfig, prompt: Prompt) -> dict[str, Any]:
    tok = bundle.tokenizer
    return {
        "max_steps": config.max_steps,
        "max_step_tokens": config.max_step_tokens,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "sep_id": tok.delimiter_id,
        "stop_ids": [tok.eos_id],
        "pad_id": tok.pad_id,
        "prompt_length": prompt.length,
    }


def _answers(bundle: LMBundle, result: Result) -> list[int | None]:
    return extract_answers(result, lambda ids: extract_answer(bundle.tokenizer.decode(ids)))


def _sample(sampler, key, bundle, config, prompt, *, scored: bool = True, **overrides) -> Result:
    """``sampler`` on ``prompt`` with the run's sampling settings and ``N`` particles; the run's
    scorer if ``scored`` (else a constant one); ``overrides`` replace or add keyword arguments."""
    scorer, params = scorer_of(bundle, config.scorer) if scored else (constant_scorer, None)
    kwargs = _sampling_kwargs(bundle, config, prompt) | {"num_particles": config.num_particles}
    return sampler(key, bundle.policy, prompt.ids, scorer, params, **(kwargs | overrides))


def _greedy(key, bundle, config, prompt):
    """One temperature-0 completion."""
    args = (key, bundle, config, prompt)
    return _sample(lm_search.best_of_n, *args, scored=False, num_particles=1, temperature=0.0), 0


def _majority(key, bundle, config, prompt):
    """Self-consistency: the most frequent answer of N samples (Wang et al. 2023)."""
    result = _sample(lm_search.best_of_n, key, bundle, config, prompt, scored=False)
    return result, lm_search.majority_vote(result, _answers(bundle, result))


def _best_of_n(weighted: bool):
    def run(key, bundle, config, prompt):
        result = _sample(lm_search.best_of_n, key, bundle, config, prompt)
        if weighted:
            return result, lm_search.weighted_best_of_n(result, _answers(bundle, result))
        return result, int(result.best)

    run.__doc__ = (
        "Weighted best-of-N: the answer with the largest summed final score."
        if weighted
        else "Best-of-N: the sample with the highest final score."
    )
    return run


def _beam(key, bundle, config, prompt):
    """Step-level beam search, beam width gcd(4, N) (Snell et al. 2024)."""
    width = math.gcd(BEAM_WIDTH, config.num_particles)
    result = _sample(lm_search.beam_search, key, bundle, config, prompt, beam_width=width)
    return result, int(result.best)


PARTICLE_SAMPLERS = {
    "pf": particle_filter.particle_filter,
    "epf": particle_filter.entropic_particle_filter,
    "gibbs": particle_filter.particle_gibbs,
}


def _particle_method(name: str):
    extra = {"num_sweeps": GIBBS_SWEEPS} if name == "gibbs" else {}

    def run(key, bundle, config, prompt):
        result = _sample(
            PARTICLE_SAMPLERS[name],
            key,
            bundle,
            config,
            prompt,
            softmax_temperature=config.softmax_temperature,
            **extra,
        )
        return result, int(result.best)

    run.__doc__ = f"{name} (Puri et al. 2025), final answer the highest-scored particle"
    return run


LM_METHODS: dict[str, LMMethod] = {
    "greedy": LMMethod(_greedy, uses_scorer=False, budget_independent=True),
    "majority": LMMethod(_majority, uses_scorer=False),
    "bon": LMMethod(_best_of_n(weighted=False), uses_scorer=True),
    "wbon": LMMethod(_best_of_n(weighted=True), uses_scorer=True),
    "beam": LMMethod(_beam, uses_scorer=True),
    "pf": LMMethod(_particle_method("pf"), uses_scorer=True),
    "epf": LMMethod(_particle_method("epf"), uses_scorer=True),
    "gibbs": LMMethod(_particle_method("gibbs"), uses_scorer=True),
}


# --------------------------------------------------------------------------- running


def encode_prompt(tokenizer: ArithTokenizer, problem: Problem) -> Prompt:
    """The problem's prompt right-padded to :data:`PROMPT_WIDTH`."""
    ids, lengths = encode_prompts(tokenizer, [problem], PROMPT_WIDTH)
    return Prompt(ids[0], int(lengths[0]))


def recorded_scorer(config: LMRunConfig) -> str:
    """The scorer a run's record names: ``"none"`` for methods that use no scorer."""
    return config.scorer if LM_METHODS[config.method].uses_scorer else "none"


def recorded_budget(config: LMRunConfig) -> int:
    """The budget a run's record names: 1 for N-independent methods (greedy)."""
    return 1 if LM_METHODS[config.method].budget_independent else config.num_particles


def run_problem(config: LMRunConfig, index: int, bundle: LMBundle) -> dict[str, Any]:
    """Run ``config.method`` on held-out problem ``index``; returns the JSON-able record.

    Args:
        config: the run (its ``problems`` range is ignored here).
        index: held-out problem index.
        bundle: models and scorers (:func:`load_lm_bundle`).

    Returns:
        ``{method, budget, seed, problem, scorer, correct, valid, answer, expected, completion,
        finished, tokens, nfe, lm_calls, prm_calls, wall_time_s, ...}``: ``correct`` is the
        checker's verdict on the selected completion's final answer, ``valid`` whether every step
        is right too; ``tokens`` counts every sampled token (also of discarded particles),
        ``prm_calls`` scorer evaluations counted per partial solution (0 for methods without a
        scorer). The wall time includes compilation on the first run of each program.
    """
    method = LM_METHODS[config.method]
    fields = problem_identity(config, index)
    problem = bundle.problems[index]
    prompt = encode_prompt(bundle.tokenizer, problem)
    key = jax.random.fold_in(jax.random.key(config.seed), index)
    start = time.perf_counter()
    result, chosen = method.run(key, bundle, config, prompt)
    jax.block_until_ready(result)
    wall = time.perf_counter() - start
    text_samples = result.samples
    length = int(text_samples.lengths[chosen])
    text = bundle.tokenizer.decode(np.asarray(text_samples.tokens[chosen])[:length])
    return {
        "method": config.method,
        "budget": recorded_budget(config),
        "seed": config.seed,
        "problem": index,
        "scorer": recorded_scorer(config),
        "temperature": config.temperature,
        "softmax_temperature": config.softmax_temperature,
        "correct": is_correct(problem, text),
        "valid": is_valid_solution(problem, text),
        "answer": extract_answer(text),
        "expected": problem.answer,
        "completion": text,
        "finished": bool(text_samples.finished[chosen]),
        "tokens": int(result.cost.tokens),
        "nfe": int(result.cost.nfe),
        "lm_calls": int(result.info.extra["lm_calls"]),
        "prm_calls": int(result.cost.reward_calls) if method.uses_scorer else 0,
        "wall_time_s": wall,
        "config": fields,
        "config_id": runs.config_id(fields),
        **step_diagnostics(result.info.flat()),
    }


def problem_identity(config: LMRunConfig, index: int) -> dict[str, Any]:
    """The fields that define one problem's result: the config (its range replaced by the problem
    index), with the budget and scorer as recorded (greedy ignores N and the scorer)."""
    fields = dataclasses.asdict(config)
    del fields["problems"]
    fields.update(
        problem=index, num_particles=recorded_budget(config), scorer=recorded_scorer(config)
    )
    return fields


def sweep_identity(base: LMRunConfig) -> dict[str, Any]:
    """What every run of an LM sweep shares: the config but method, N, seed and problems."""
    fields = dataclasses.asdict(base)
    for swept in ("method", "num_particles", "seed", "problems"):
        del fields[swept]
    return fields


DIAGNOSTICS = ("ess", "resampled", "unique_ancestors")


def step_diagnostics(info: dict[str, Any]) -> dict[str, list]:
    """Per-step SMC diagnostics (ESS, resampling events, unique ancestors) of particle methods."""
    present = [k for k in DIAGNOSTICS if k in info and np.size(info[k])]
    return {f"step_{k}": np.asarray(info[k]).tolist() for k in present}


def record_collapse(record: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`tts_jax.diagnostics.weight_collapse` of one problem's record (``None`` without
    per-step ESS: methods that do not weight particles)."""
    steps = {k: record[f"step_{k}"] for k in DIAGNOSTICS if f"step_{k}" in record}
    return diagnostics.weight_collapse(steps, record["budget"])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (mean and standard error over problems), mean costs and the number of problems
    whose particle weights collapsed (``collapsed_problems``, for weighted particle methods)."""
    correct = np.asarray([float(r["correct"]) for r in records])
    se = correct.std(ddof=1) / np.sqrt(len(correct)) if len(correct) > 1 else 0.0
    out = {"correct": float(correct.mean()), "correct_se": float(se)}
    for name in ("tokens", "lm_calls", "prm_calls", "wall_time_s"):
        out[name] = float(np.mean([r[name] for r in records]))
    collapses = [record_collapse(r) for r in records]
    if any(c is not None for c in collapses):
        out["collapsed_problems"] = sum(bool(c and c["collapsed"]) for c in collapses)
    return out


def write_lm_run(out_dir: str | pathlib.Path, config: LMRunConfig, summary: dict) -> list[str]:
    """Write a :func:`run_lm` summary as a run folder; returns the names of the files written.

    ``config.json`` (config, versions), ``result.json`` (the summary without its records),
    ``samples.jsonl`` (one record per problem), ``samples.npz`` (per problem: ``problem``,
    ``completion``, ``answer`` (0 where ``has_answer`` is false), ``expected``,
    ``correct``) and ``diagnostics.npz``
    (per problem ``tokens``, ``prm_calls`` and, for particle methods, ``ess``, ``resampled``,
    ``unique_ancestors`` as ``[P, steps]``).
    """
    out = pathlib.Path(out_dir)
    records = summary["records"]
    files = ["config.json", "result.json", "samples.jsonl", "samples.npz", "diagnostics.npz"]
    result = {k: v for k, v in summary.items() if k != "records"} | {"files": files}
    runs.write_json(out / "config.json", {"config": config, "environment": runs.environment()})
    runs.write_json(out / "result.json", result)
    (out / "samples.jsonl").unlink(missing_ok=True)
    for record in records:
        runs.append_jsonl(out / "samples.jsonl", record)
    np.savez(
        out / "samples.npz",
        problem=np.asarray([r["problem"] for r in records], np.int32),
        completion=np.asarray([r["completion"] for r in records], dtype=np.str_),
        answer=np.asarray([r["answer"] or 0 for r in records], np.int64),
        has_answer=np.asarray([r["answer"] is not None for r in records], bool),
        expected=np.asarray([r["expected"] for r in records], np.int64),
        correct=np.asarray([r["correct"] for r in records], bool),
    )
    per_problem = {
        "tokens": np.asarray([r["tokens"] for r in records], np.int64),
        "prm_calls": np.asarray([r["prm_calls"] for r in records], np.int64),
    }
    for k in DIAGNOSTICS:
        if all(f"step_{k}" in r for r in records):
            per_problem[k] = np.asarray([r[f"step_{k}"] for r in records])
    np.savez(out / "diagnostics.npz", **per_problem)
    return files


def run_lm(config: LMRunConfig, bundle: LMBundle | None = None) -> dict[str, Any]:
    """Run one method at one budget and seed on every problem of ``config.problems``.

    Args:
        config: the run.
        bundle: models (default: :func:`load_lm_bundle`, with the PRM only if needed).

    Returns:
        ``{method, budget, seed, scorer, problems, correct, correct_se, tokens, lm_calls,
        prm_calls, wall_time_s, records}``: accuracy and mean costs over the problems, and the
        per-problem records of :func:`run_problem`.
    """
    if bundle is None:
        bundle = load_lm_bundle(with_prm=recorded_scorer(config) == "prm")
    records = [run_problem(config, i, bundle) for i in range(*config.problems)]
    return {
        "method": config.method,
        "budget": recorded_budget(config),
        "seed": config.seed,
        "scorer": recorded_scorer(config),
        "problems": list(config.problems),
        **summarize(records),
        "records": records,
    }


def plan_sweep(
    base: LMRunConfig,
    methods: Iterable[str],
    budgets: Iterable[int],
    seeds: Iterable[int],
    problems: Iterable[int],
) -> list[tuple[LMRunConfig, int]]:
    """Every (config, problem) of a sweep, validated: N-independent methods (greedy) run once
    per problem with the first seed; the rest for every budget and seed."""
    methods, budgets, seeds, problems = list(methods), list(budgets), list(seeds), list(problems)
    bad = [i for i in problems if not 0 <= i < N_EVAL_PROBLEMS]
    if bad:
        raise ValueError(f"problem indices must lie in [0, {N_EVAL_PROBLEMS}), got {bad}")
    plan = []
    for method in methods:
        grid = (
            [(budgets[0], seeds[0])]
            if method in LM_METHODS and LM_METHODS[method].budget_independent
            else [(b, s) for b in budgets for s in seeds]
        )
        for budget, seed in grid:
            config = dataclasses.replace(base, method=method, num_particles=budget, seed=seed)
            plan += [(config, i) for i in problems]
    return plan


def _plan(problems: Sequence[int]):
    def plan(base: LMRunConfig, methods, budgets, seeds) -> list[sweeps.Unit]:
        return [sweeps.Unit(c, i) for c, i in plan_sweep(base, methods, budgets, seeds, problems)]

    return plan


def _load(units: list[sweeps.Unit]) -> LMBundle:
    return load_lm_bundle(with_prm=any(recorded_scorer(u.config) == "prm" for u in units))


def arith_task(problems: Iterable[int]) -> sweeps.Task:
    """The sweep engine's task for held-out arithmetic ``problems`` (one unit per problem)."""
    return sweeps.Task(
        name="sweep_lm",
        plan=_plan(list(problems)),
        shared=sweep_identity,
        identity=lambda unit: problem_identity(unit.config, unit.item),
        load=_load,
        check=lambda units, bundle: None,  # LMRunConfig and plan_sweep check everything
        run=lambda unit, bundle: run_problem(unit.config, unit.item, bundle),
    )


def sweep_lm(
    methods: Iterable[str],
    budgets: Iterable[int],
    seeds: Iterable[int],
    problems: Iterable[int],
    out_dir: str | pathlib.Path,
    *,
    base: LMRunConfig | None = None,
    bundle: LMBundle | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (method, N, seed, problem) with the sweep engine (:func:`tts_jax.app.sweeps.sweep`).

    The folder holds ONE configuration of the fields that are not swept (scorer, temperatures,
    step limits; another one is refused, naming the differences). Runs recorded there with the
    same identity (``config_id``: the whole config, the problem and the package versions) are
    skipped, so an interrupted sweep resumes where it stopped (a truncated last line is re-run).

    Args:
        methods: names in :data:`LM_METHODS`.
        budgets: particle budgets N.
        seeds: PRNG seeds.
        problems: held-out problem indices.
        out_dir: folder of ``runs.jsonl``.
        base: the other config fields (scorer, temperatures, ...); default :class:`LMRunConfig`.
        bundle: models (default: loaded only if there is work to do).
        progress: show a progress bar.

    Returns:
        The records of exactly the requested runs.

    Raises:
        ValueError: an invalid config (unknown method, N < 1, ...) or a folder of another
            configuration, before anything runs.
    """
    base = LMRunConfig() if base is None else base
    task = arith_task(problems)
    return sweeps.sweep(
        task, base, methods, budgets, seeds, out_dir, bundle=bundle, progress=progress
    )

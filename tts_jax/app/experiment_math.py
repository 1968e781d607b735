"""LM steering runs on the math task: the setup of Puri et al. 2025 ("A Probabilistic Inference
Approach to Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods") on the
models researchers steer (a Qwen2.5-Math-*-Instruct policy folder, a Qwen2.5-Math-PRM folder,
MATH500-style problems), for any LM method of the library.

A run is (:class:`MathRunConfig`: method, particle budget ``N``, seed, problem range, ...).
:data:`MATH_METHODS` maps a method name to an adapter calling a library sampler with the task's
prompt (:func:`~tts_jax.app.tasks.math.prompting.build_prompt`), the policy's stop ids and pad id
(``generation_config.json``), the step separators (every token whose text ends with the
separator, ``"\\n\\n"`` by default:
:func:`~tts_jax.app.tasks.math.prm_format.separator_token_ids`) and the PRM fed the model card's
conversation. ``prm_scoring`` chooses how (both built once per bundle, with the same rewards):

- ``incremental`` (default): :func:`~tts_jax.app.tasks.math.prm_format.conversation_prm_scorer`,
  the PRM's KV cache kept per particle; after each step only the step's re-tokenized text and
  its ``<extra_0>`` are appended (a host round trip for the tokenizers, linear in the steps);
- ``host``: :func:`~tts_jax.app.tasks.math.prm_format.prm_host_fn` in
  :func:`~tts_jax.samplers.lm.scoring.host_scorer`, the whole conversation re-tokenized and
  re-read by the PRM at every step (quadratic; kept as a reference and a fallback).

The methods:

- ``greedy``: one temperature-0 completion (budget recorded as 1);
- ``majority``: self-consistency over ``N`` samples (no PRM);
- ``bon`` / ``wbon``: best-of-``N`` scored by the PRM at the end (argmax / weighted vote);
- ``beam``: step-level beam search, beam width ``gcd(4, N)``;
- ``dvts``: diverse verifier tree search, ``N / gcd(4, N)`` subtrees;
- ``pf``: step-level particle filtering (Puri et al. 2025);
- ``epf``: entropic particle filtering (annealed weights, systematic resampling);
- ``gibbs``: particle Gibbs, 2 sweeps of ``N / 2`` particles (``N >= 4``).

Token-level SMC (:func:`~tts_jax.samplers.lm.token_smc.token_smc`) is not offered: it weighs
every token by a twist ``psi(prefix)``, and the PRM is not one (it scores whole steps); with the
PRM as a final potential only, it is best-of-``N`` importance weighting paid at token cost.

The final answer of every method is chosen by the config's ``selection`` rule over the
``\\boxed{}`` answers of the ``N`` completions (:data:`SELECTIONS`: ``argmax`` of the final PRM
score, or a vote over math-verify equivalence classes: ``majority``, ``weighted`` (summed PRM
scores, the weighted best-of-N of Puri et al.), ``weight_vote`` (summed particle weights)); each
method has a default (majority: ``majority``, wbon: ``weighted``, others: ``argmax``).

:func:`run_math` appends one record per problem to ``<out_dir>/runs.jsonl`` as it finishes,
through the sweep engine (:func:`tts_jax.app.sweeps.sweep`): a restarted run skips the problems
already recorded with the same identity (the resolved config, the problem's text, fingerprints
of the model folders, package versions), and a folder that holds another configuration is
refused (:class:`ConfigMismatchError`). It then writes ``result.json``: accuracy with a 95%
Wilson score interval, mean costs, the resolved config, seed and package versions.

Limits: a separator that the policy writes as several tokens (no token's text ends with all of
it) does not end a step (it runs on to ``max_step_tokens``). The host PRM scorer reads the
problem back from a ChatML prompt, so with ``prm_scoring="host"`` the policy must use ChatML
(Qwen2 / Qwen2.5); the incremental one is given the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from tts_jax.app import runs, sweeps
from tts_jax.app.experiment_lm import constant_scorer, step_diagnostics, summarize
from tts_jax.app.tasks.math import answers as math_answers
from tts_jax.app.tasks.math import prm_format, prompting
from tts_jax.app.tasks.math.data import MathProblem, load_problems
from tts_jax.app.tasks.math.prompting import QWEN_MATH_SYSTEM, GenerationSettings
from tts_jax.samplers.lm import particle_filter
from tts_jax.samplers.lm import search as lm_search
from tts_jax.samplers.lm.answers import argmax, select
from tts_jax.samplers.lm.scoring import AGGREGATIONS, StepScorer, host_scorer
from tts_jax.samplers.result import Result

DEFAULT_TEMPERATURE = 0.8
"""Sampling temperature when neither the config nor ``generation_config.json`` sets one (the
value of Puri et al. 2025)."""
DEFAULT_MAX_NEW_TOKENS = 2048
"""Completion budget when neither the config nor ``generation_config.json`` sets one."""
BEAM_WIDTH = 4
GIBBS_SWEEPS = 2
PROMPT_BUCKET = 64
"""Prompts are right-padded to a multiple of this many tokens, so problems of similar length
share one compiled sampler."""
PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"
Z_95 = 1.959963984540054
TASK_PACKAGES = ("transformers", "tokenizers", "math-verify")
"""Packages whose version can change a math run's numbers beyond
:data:`tts_jax.app.runs.IDENTITY_PACKAGES` (tokenization, answer equivalence)."""

SELECTIONS: dict[str, Callable[..., int]] = {
    "argmax": argmax,
    "majority": math_answers.majority,
    "weighted": math_answers.weighted,
    "weight_vote": math_answers.weight_vote,
}
"""Final-answer rules by name (``rule(result, answers, key) -> index``)."""
PRM_SCORINGS = ("incremental", "host")
"""How the PRM reads a partial solution (:class:`MathRunConfig` ``prm_scoring``)."""


class NotAPRMError(ValueError):
    """The ``prm`` folder is not a Qwen2.5-Math-PRM-style process reward model."""


class ConfigMismatchError(ValueError):
    """The output folder holds runs of another configuration."""


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathRunConfig:
    """One LM steering run over a range of math problems.

    Attributes:
        method: a name in :data:`MATH_METHODS`.
        num_particles: N, the budget (samples / particles / beams).
        policy: the policy folder (config.json, safetensors, tokenizer with a chat template,
            generation_config.json).
        prm: the PRM folder (``Qwen2ForProcessRewardModel``); needed by methods with a scorer,
            ignored (resolved to ``None``) by the others.
        data: problems file or folder (:func:`~tts_jax.app.tasks.math.data.load_problems`).
        problem_field: column of the problem statement.
        answer_field: column of the reference answer.
        problems: half-open range ``(start, stop)`` of problem indices.
        seed: PRNG seed (problem ``i`` uses ``fold_in(key(seed), i)``).
        temperature: LM sampling temperature; ``None``: the policy's ``generation_config.json``,
            else :data:`DEFAULT_TEMPERATURE`.
        softmax_temperature: ``T_softmax`` of the particle weights (pf, epf, gibbs).
        max_steps: steps per solution (particles still running after them are unfinished).
        max_step_tokens: token limit of one step.
        max_new_tokens: completion budget; ``None``: ``generation_config.json``, else
            :data:`DEFAULT_MAX_NEW_TOKENS`.
        separator: step separator text: a step ends at every policy token whose text ends with
            it (:func:`~tts_jax.app.tasks.math.prm_format.separator_token_ids`).
        system_prompt: system message of the policy prompt and of the PRM conversation.
        aggregation: per-step PRM scores -> one score: ``last`` | ``min`` | ``prod`` | ``model``.
        selection: final-answer rule in :data:`SELECTIONS`; ``None``: the method's default.
        prm_scoring: how the PRM reads the steps, in :data:`PRM_SCORINGS` (same rewards):
            ``incremental`` (its KV cache fed one step at a time) or ``host`` (the whole
            conversation re-read at every step).
        prm_token_ratio: the incremental scorer's bound on PRM tokens per policy token
            (:class:`~tts_jax.models.lm_reward.ConversationPRMScorer` ``token_ratio``): its PRM
            cache holds the head plus ``prm_token_ratio * max_new_tokens`` tokens, and a step
            that re-encodes to more than ``prm_token_ratio * max_step_tokens`` is an error.
        out_dir: the run folder (``runs.jsonl``, ``config.json``, ``result.json``).
    """

    method: str = "pf"
    num_particles: int = 8
    policy: str = ""
    prm: str | None = None
    data: str = ""
    problem_field: str = "problem"
    answer_field: str = "answer"
    problems: tuple[int, int] = (0, 1)
    seed: int = 0
    temperature: float | None = None
    softmax_temperature: float = 1.0
    max_steps: int = 32
    max_step_tokens: int = 256
    max_new_tokens: int | None = None
    separator: str = prm_format.STEP_SEPARATOR
    system_prompt: str = QWEN_MATH_SYSTEM
    aggregation: str = "last"
    selection: str | None = None
    prm_scoring: str = "incremental"
    prm_token_ratio: int = 2
    out_dir: str = "outputs/lm-math"

    def __post_init__(self):
        if self.method not in MATH_METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(MATH_METHODS)}")
        if not self.policy or not self.data:
            raise ValueError(f"a math run needs a policy folder and a data file, got {self}")
        if MATH_METHODS[self.method].uses_scorer and not self.prm:
            raise ValueError(f"method {self.method!r} is steered by a PRM: set prm (--prm DIR)")
        if self.num_particles < 1:
            raise ValueError(f"num_particles (the budget N) must be >= 1, got {self.num_particles}")
        if self.method == "gibbs" and self.num_particles < 2 * GIBBS_SWEEPS:
            raise ValueError(
                f"gibbs runs {GIBBS_SWEEPS} sweeps of at least 2 particles: num_particles "
                f"must be >= {2 * GIBBS_SWEEPS}, got {self.num_particles}"
            )
        if self.prm_scoring not in PRM_SCORINGS:
            raise ValueError(
                f"unknown prm_scoring {self.prm_scoring!r}; known: {sorted(PRM_SCORINGS)}"
            )
        if self.prm_token_ratio < 1:
            raise ValueError(f"prm_token_ratio must be >= 1, got {self.prm_token_ratio}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; known: {sorted(SELECTIONS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r}; known: {sorted(AGGREGATIONS)}"
            )
        start, stop = self.problems
        if not 0 <= start < stop:
            raise ValueError(
                f"problems must be a range (start, stop), 0 <= start < stop, got {self.problems}"
            )
        sizes = {
            "max_steps": self.max_steps,
            "max_step_tokens": self.max_step_tokens,
            "max_new_tokens": 1 if self.max_new_tokens is None else self.max_new_tokens,
        }
        if min(sizes.values()) < 1:
            raise ValueError(f"every size must be >= 1, got {sizes}")
        t = 0.0 if self.temperature is None else self.temperature
        if not np.isfinite([t, self.softmax_temperature]).all() or t < 0:
            raise ValueError(f"need a finite temperature >= 0, got {self.temperature}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"need softmax_temperature > 0, got {self.softmax_temperature}")


def resolve_config(config: MathRunConfig, settings: GenerationSettings) -> MathRunConfig:
    """The config a run records: temperature, ``max_new_tokens`` and selection filled in
    (``settings``, then the defaults), absolute folder paths, budget 1 for greedy, no PRM for
    methods without a scorer."""
    method = MATH_METHODS[config.method]
    temperature = config.temperature
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE if settings.temperature is None else settings.temperature
    max_new = config.max_new_tokens or settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    return dataclasses.replace(
        config,
        policy=str(pathlib.Path(config.policy).resolve()),
        prm=str(pathlib.Path(config.prm).resolve()) if method.uses_scorer else None,
        data=str(pathlib.Path(config.data).resolve()),
        temperature=0.0 if config.method == "greedy" else float(temperature),
        max_new_tokens=int(max_new),
        selection=config.selection or method.selection,
        num_particles=1 if method.budget_independent else config.num_particles,
    )


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class MathBundle:
    """What a run uses, loaded once per process (:func:`load_math_bundle`): the samplers compile
    per scorer object, so reuse a bundle across problems and methods.

    Attributes:
        policy: the policy :class:`~tts_jax.models.lm.LM`.
        tokenizer: its ``transformers`` tokenizer.
        settings: its generation settings (stop ids, pad id, temperature, budget).
        sep_ids: the policy tokens that end a step.
        problems: the problems of ``data``.
        prm_tokenizer: the PRM's tokenizer (``None`` without a PRM).
        prm: the PRM (:class:`~tts_jax.models.lm_reward.RewardModel`, or ``None``).
        scorers: the PRM step scorers by ``prm_scoring`` name (empty without a PRM).
    """

    policy: Any
    tokenizer: Any
    settings: GenerationSettings
    sep_ids: tuple[int, ...]
    problems: tuple[MathProblem, ...]
    prm_tokenizer: Any = None
    prm: Any = None
    scorers: dict[str, StepScorer] = dataclasses.field(default_factory=dict)

    def scorer_and_params(self, config: MathRunConfig, problem: str) -> tuple[StepScorer, Any]:
        """The PRM scorer of ``config.prm_scoring`` and its ``scorer_params`` for ``problem``
        (the incremental one's conversation head; the host one reads the prompt).

        Raises:
            ValueError: the bundle was loaded without the PRM.
        """
        if not self.scorers:
            raise ValueError(
                f"method {config.method!r} needs the PRM: the bundle was loaded without"
            )
        if config.prm_scoring == "host":
            return self.scorers["host"], None
        params = prm_format.conversation_params(
            self.prm, self.prm_tokenizer, problem, config.system_prompt
        )
        scorer = dataclasses.replace(
            self.scorers["incremental"], token_ratio=config.prm_token_ratio
        )  # equal scorers for equal ratios: no recompilation
        return scorer, params


def check_prm_folder(path: str | pathlib.Path) -> Any:
    """Check that ``path`` holds a Qwen2.5-Math-PRM-style model; returns its tokenizer.

    Raises:
        FileNotFoundError: no folder or no ``config.json``.
        NotAPRMError: another architecture (e.g. a policy folder), or a tokenizer without the
            ``<extra_0>`` step token.
    """
    folder = pathlib.Path(path)
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"PRM folder {folder}: no config.json")
    try:
        archs = json.loads(file.read_text()).get("architectures") or []
    except json.JSONDecodeError as err:
        raise NotAPRMError(f"{file}: invalid JSON ({err})") from err
    if archs != [PRM_ARCHITECTURE]:
        raise NotAPRMError(
            f"{folder} is not a process reward model: config.json architectures {archs}, "
            f"expected [{PRM_ARCHITECTURE!r}] (e.g. Qwen/Qwen2.5-Math-PRM-7B); "
            "a policy folder goes to --policy"
        )
    tokenizer = prompting.load_tokenizer(folder)
    try:
        prm_format.step_token_id(tokenizer)
    except ValueError as err:
        raise NotAPRMError(f"{folder}: {err}") from err
    return tokenizer


def load_prm(path: str | pathlib.Path) -> tuple[Any, Any]:
    """``(tokenizer, RewardModel)`` of a PRM folder (checked by :func:`check_prm_folder`)."""
    from tts_jax.models.lm_reward import load_reward_model

    tokenizer = check_prm_folder(path)
    return tokenizer, load_reward_model(path)[1]


def load_math_bundle(config: MathRunConfig, *, with_prm: bool | None = None) -> MathBundle:
    """Load the policy, the tokenizers, the generation settings, the PRM and its scorers (both
    :data:`PRM_SCORINGS`, built once), and the problems of ``config``.

    Args:
        config: the run (its folders, data, separator and system prompt are used).
        with_prm: load the PRM; default: when the method uses a scorer (pass ``True`` to share
            one bundle between methods with and without one).

    Raises:
        FileNotFoundError: a folder or file is missing.
        NotAPRMError: the PRM folder is not a PRM.
        ValueError: no policy token ends with the separator, invalid files, problems without
            the fields (naming the line), ...
    """
    from tts_jax.models.lm import load_lm

    tokenizer = prompting.load_tokenizer(config.policy)
    settings = prompting.read_generation_settings(config.policy, tokenizer)
    sep_ids = prm_format.separator_token_ids(tokenizer, config.separator)
    if not sep_ids:
        raise ValueError(
            f"no token of the policy tokenizer ends with the step separator {config.separator!r}"
        )
    problems = tuple(load_problems(config.data, config.problem_field, config.answer_field))
    if with_prm is None:
        with_prm = MATH_METHODS[config.method].uses_scorer
    prm_tokenizer = prm = None
    scorers = {}
    if with_prm:
        if not config.prm:
            raise ValueError("load_math_bundle(with_prm=True) needs config.prm")
        prm_tokenizer, prm = load_prm(config.prm)
        scorers["incremental"] = prm_format.conversation_prm_scorer(
            tokenizer, prm_tokenizer, config.separator
        )
        scorers["host"] = host_scorer(
            prm_format.prm_host_fn(
                tokenizer,
                prm_tokenizer,
                prm,
                separator=config.separator,
                system_prompt=config.system_prompt,
            )
        )
    _, policy = load_lm(config.policy)
    return MathBundle(policy, tokenizer, settings, sep_ids, problems, prm_tokenizer, prm, scorers)


# --------------------------------------------------------------------------- methods


class Prompt(NamedTuple):
    """A prompt right-padded to a multiple of :data:`PROMPT_BUCKET`, its real length and the
    problem statement it asks (for the PRM's own conversation)."""

    ids: np.ndarray
    length: int
    problem: str = ""


class MathMethod(NamedTuple):
    """A registry entry.

    Attributes:
        run: ``(key, bundle, config, prompt) -> Result`` (a library sampler's result).
        uses_scorer: the method consults the PRM.
        selection: the default final-answer rule (a name in :data:`SELECTIONS`).
        budget_independent: the method ignores ``N`` (recorded with budget 1).
    """

    run: Callable[[jax.Array, MathBundle, MathRunConfig, Prompt], Result]
    uses_scorer: bool
    selection: str = "argmax"
    budget_independent: bool = False


def _sample(sampler, key, bundle, config, prompt, *, scored=True, **overrides) -> Result:
    """``sampler`` on ``prompt`` with the run's settings and ``N`` particles, scored by the PRM
    if ``scored`` (else by a constant); ``overrides`` replace or add keyword arguments."""
    scorer, params = constant_scorer, None
    if scored:
        scorer, params = bundle.scorer_and_params(config, prompt.problem)
    kwargs = {
        "num_particles": config.num_particles,
        "max_steps": config.max_steps,
        "max_step_tokens": config.max_step_tokens,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "sep_ids": list(bundle.sep_ids),
        "stop_ids": list(bundle.settings.stop_ids),
        "pad_id": bundle.settings.pad_id,
        "aggregation": config.aggregation,
        "prompt_length": prompt.length,
    }
    return sampler(key, bundle.policy, prompt.ids, scorer, params, **(kwargs | overrides))


def _greedy(key, bundle, config, prompt):
    """One temperature-0 completion."""
    return _sample(lm_search.best_of_n, key, bundle, config, prompt, scored=False, num_particles=1)


def _independent(scored: bool, doc: str):
    def run(key, bundle, config, prompt):
        return _sample(lm_search.best_of_n, key, bundle, config, prompt, scored=scored)

    run.__doc__ = doc
    return run


def _tree(sampler, doc: str):
    def run(key, bundle, config, prompt):
        width = math.gcd(BEAM_WIDTH, config.num_particles)
        return _sample(sampler, key, bundle, config, prompt, beam_width=width)

    run.__doc__ = doc
    return run


def _particles(sampler, doc: str, **extra):
    def run(key, bundle, config, prompt):
        t = config.softmax_temperature
        return _sample(sampler, key, bundle, config, prompt, softmax_temperature=t, **extra)

    run.__doc__ = doc
    return run


MATH_METHODS: dict[str, MathMethod] = {
    "greedy": MathMethod(_greedy, uses_scorer=False, budget_independent=True),
    "majority": MathMethod(
        _independent(False, "Self-consistency: the most frequent answer of N samples."),
        uses_scorer=False,
        selection="majority",
    ),
    "bon": MathMethod(
        _independent(True, "Best-of-N: the sample with the highest final PRM score."),
        uses_scorer=True,
    ),
    "wbon": MathMethod(
        _independent(True, "Weighted best-of-N: the answer with the largest summed PRM score."),
        uses_scorer=True,
        selection="weighted",
    ),
    "beam": MathMethod(
        _tree(lm_search.beam_search, "Step-level beam search, beam width gcd(4, N)."),
        uses_scorer=True,
    ),
    "dvts": MathMethod(
        _tree(lm_search.dvts, "Diverse verifier tree search, N / gcd(4, N) subtrees."),
        uses_scorer=True,
    ),
    "pf": MathMethod(
        _particles(particle_filter.particle_filter, "Particle filtering (Puri et al. 2025)."),
        uses_scorer=True,
    ),
    "epf": MathMethod(
        _particles(
            particle_filter.entropic_particle_filter,
            "Entropic particle filtering (annealed weights, systematic resampling).",
        ),
        uses_scorer=True,
    ),
    "gibbs": MathMethod(
        _particles(
            particle_filter.particle_gibbs,
            f"Particle Gibbs, {GIBBS_SWEEPS} sweeps of N / {GIBBS_SWEEPS} particles.",
            num_sweeps=GIBBS_SWEEPS,
        ),
        uses_scorer=True,
    ),
}
"""The math task's methods by name (the command line's ``lm-<method>`` presets)."""


# --------------------------------------------------------------------------- one problem


def encode_prompt(bundle: MathBundle, config: MathRunConfig, problem: MathProblem) -> Prompt:
    """The chat prompt of ``problem``, right-padded with the pad id to a multiple of
    :data:`PROMPT_BUCKET`."""
    ids = prompting.build_prompt(bundle.tokenizer, problem.problem, config.system_prompt)
    width = -(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.full((width,), bundle.settings.pad_id, np.int32)
    padded[: len(ids)] = ids
    return Prompt(padded, len(ids), problem.problem)


def completion_texts(bundle: MathBundle, result: Result) -> list[str]:
    """Every particle's decoded completion, cut at the first multi-token stop string (the
    samplers stop on single tokens only)."""
    tokens, lengths = np.asarray(result.samples.tokens), np.asarray(result.samples.lengths)
    texts = bundle.tokenizer.batch_decode(
        [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])],
        skip_special_tokens=True,
    )
    out = []
    for text in texts:
        for stop in bundle.settings.multi_token_stops:
            text = text.split(stop, 1)[0]
        out.append(text)
    return out


def problem_sha(problem: MathProblem) -> str:
    """A short hash of a problem's statement and reference answer."""
    return hashlib.sha256(f"{problem.problem}\0{problem.answer}".encode()).hexdigest()[:16]


def run_problem(config: MathRunConfig, problem: MathProblem, bundle: MathBundle) -> dict[str, Any]:
    """Run the (resolved) ``config.method`` on one problem; returns its JSON-able record.

    Returns:
        ``{method, budget, seed, problem, unique_id, selection, correct, any_correct, answer,
        expected, completion, finished, answered, tokens, nfe, lm_calls, prm_calls,
        sample_time_s, wall_time_s, config, config_id, step_* diagnostics}``: ``correct``:
        the selected answer is equivalent to the reference (math-verify); ``any_correct``: some
        particle's is (pass@N); ``answered``: particles with a ``\\boxed{}`` answer; the sampling
        time includes compilation on the first problem of each prompt width.
    """
    method = MATH_METHODS[config.method]
    key = jax.random.fold_in(jax.random.key(config.seed), problem.index)
    sample_key, select_key = jax.random.split(key)
    start = time.perf_counter()
    result = method.run(sample_key, bundle, config, encode_prompt(bundle, config, problem))
    jax.block_until_ready(result)
    sampled = time.perf_counter() - start
    texts = completion_texts(bundle, result)
    answers = [math_answers.extract_boxed(t) for t in texts]
    chosen = select(result, SELECTIONS[config.selection], answers, select_key)
    correct = math_answers.is_equivalent(problem.answer, answers[chosen])
    distinct = {a for a in answers if a is not None}
    any_correct = any(math_answers.is_equivalent(problem.answer, a) for a in distinct)
    fields = problem_identity(config, problem, folder_fingerprints(config))
    return {
        "method": config.method,
        "budget": config.num_particles,
        "seed": config.seed,
        "problem": problem.index,
        "unique_id": problem.extra.get("unique_id"),
        "selection": config.selection,
        "correct": bool(correct),
        "any_correct": bool(any_correct),
        "answer": answers[chosen],
        "expected": problem.answer,
        "completion": texts[chosen],
        "finished": bool(np.asarray(result.samples.finished)[chosen]),
        "answered": sum(a is not None for a in answers),
        "tokens": int(result.cost.tokens),
        "nfe": int(result.cost.nfe),
        "lm_calls": int(result.info.extra["lm_calls"]),
        "prm_calls": int(result.cost.reward_calls) if method.uses_scorer else 0,
        "sample_time_s": sampled,
        "wall_time_s": time.perf_counter() - start,
        "config": fields,
        "config_id": runs.config_id(fields),
        **step_diagnostics(result.info.flat()),
    }


# --------------------------------------------------------------------------- identity


def folder_fingerprint(path: str | None) -> str | None:
    """A short hash of a model folder: its JSON configs and tokenizer files, and the names and
    sizes of its safetensors files (so another model at the same path is another config)."""
    if path is None:
        return None
    folder = pathlib.Path(path)
    digest = hashlib.sha256()
    names = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json")
    for name in names:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


_FINGERPRINTS: dict[tuple[str, str | None], dict[str, str | None]] = {}


def folder_fingerprints(config: MathRunConfig) -> dict[str, str | None]:
    """:func:`folder_fingerprint` of the policy and PRM folders (memoized per process)."""
    key = (config.policy, config.prm)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = {
            "policy": folder_fingerprint(config.policy),
            "prm": folder_fingerprint(config.prm),
        }
    return _FINGERPRINTS[key]


def task_versions() -> dict[str, str | None]:
    """Versions of :data:`TASK_PACKAGES` (``None``: not installed)."""
    out = {}
    for name in TASK_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def shared_identity(config: MathRunConfig, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """What every problem of a run folder shares: the resolved config but its problem range and
    folder, the model folders' fingerprints and the task's package versions."""
    fields = dataclasses.asdict(config)
    del fields["problems"], fields["out_dir"]
    return fields | {"fingerprints": fingerprints, "task_versions": task_versions()}


def problem_identity(
    config: MathRunConfig, problem: MathProblem, fingerprints: dict[str, Any]
) -> dict[str, Any]:
    """The fields that define one problem's result: :func:`shared_identity`, the problem's
    index and a hash of its statement and answer."""
    return shared_identity(config, fingerprints) | {
        "problem": problem.index,
        "problem_sha": problem_sha(problem),
    }


def claim_folder(out_dir: str | pathlib.Path, shared: dict[str, Any]) -> None:
    """:func:`tts_jax.app.runs.claim_sweep_folder`, refusing with :class:`ConfigMismatchError`."""
    try:
        runs.claim_sweep_folder(out_dir, shared)
    except ValueError as err:
        raise ConfigMismatchError(str(err)) from None


# --------------------------------------------------------------------------- running


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default ``z``); ``(0, 1)``
    for ``n = 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize_math(config: MathRunConfig, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval, pass@N, mean costs and collapses of a run."""
    correct = sum(bool(r["correct"]) for r in records)
    low, high = wilson_interval(correct, len(records))
    return {
        "method": config.method,
        "budget": config.num_particles,
        "seed": config.seed,
        "selection": config.selection,
        "problems": list(config.problems),
        "num_problems": len(records),
        "num_correct": correct,
        **summarize(list(records)),
        "correct_ci95": [low, high],
        "ci_method": "wilson",
        "any_correct": float(np.mean([bool(r["any_correct"]) for r in records])),
    }


def math_task(
    problems: Sequence[MathProblem], fingerprints: dict[str, Any], name: str = "lm-math"
) -> sweeps.Task:
    """The sweep engine's task of one math run: one unit per problem of ``config.problems``
    (``problems``: the loaded problems, indexed by position)."""

    def plan(base, methods, budgets, seeds):
        return [sweeps.Unit(base, i) for i in range(*base.problems)]

    def check(units, bundle):
        if MATH_METHODS[units[0].config.method].uses_scorer and not bundle.scorers:
            raise ValueError(f"method {units[0].config.method!r} needs a bundle with the PRM")

    return sweeps.Task(
        name=name,
        plan=plan,
        shared=lambda base: shared_identity(base, fingerprints),
        identity=lambda unit: problem_identity(unit.config, problems[unit.item], fingerprints),
        load=lambda units: load_math_bundle(units[0].config),
        check=check,
        run=lambda unit, bundle: run_problem(unit.config, problems[unit.item], bundle),
    )


def run_math(
    config: MathRunConfig, bundle: MathBundle | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run one method at one budget and seed on every problem of ``config.problems``.

    Problems already recorded in ``<out_dir>/runs.jsonl`` with the same identity are not run
    again (an interrupted run resumes; a truncated last line is re-run); each finished problem
    is appended as it finishes. Then ``<out_dir>/result.json`` gets the summary of the requested
    range, the resolved config, the generation settings and the environment.

    Args:
        config: the run.
        bundle: models (:func:`load_math_bundle` of a config with the same folders, data,
            separator and system prompt); default: loaded only if a problem is left to run.
        progress: show a progress bar.

    Returns:
        :func:`summarize_math` of the requested problems, with ``records`` (one per problem).

    Raises:
        ConfigMismatchError: ``out_dir`` holds runs of another configuration.
        NotAPRMError: the PRM folder is not a PRM.
        ValueError: the problem range exceeds the data, or as :class:`MathRunConfig`.
    """
    if bundle is None:
        tokenizer = prompting.load_tokenizer(config.policy)
        settings = prompting.read_generation_settings(config.policy, tokenizer)
        problems = load_problems(config.data, config.problem_field, config.answer_field)
        if MATH_METHODS[config.method].uses_scorer:
            check_prm_folder(config.prm)  # fail before any model is loaded
    else:
        settings, problems = bundle.settings, bundle.problems
    resolved = resolve_config(config, settings)
    if resolved.problems[1] > len(problems):
        raise ValueError(
            f"problems {resolved.problems} exceed the {len(problems)} problems of {config.data}"
        )
    fingerprints = folder_fingerprints(resolved)
    claim_folder(config.out_dir, shared_identity(resolved, fingerprints))
    task = math_task(problems, fingerprints, f"lm-{config.method}")
    n, seed = resolved.num_particles, resolved.seed
    records = sweeps.sweep(
        task,
        resolved,
        [resolved.method],
        [n],
        [seed],
        config.out_dir,
        bundle=bundle,
        progress=progress,
    )
    summary = summarize_math(resolved, records)
    runs.write_json(
        pathlib.Path(config.out_dir) / "result.json",
        {
            **summary,
            "config": resolved,
            "generation_settings": settings._asdict(),
            "environment": runs.environment(),
            "task_versions": task_versions(),
            "records": "runs.jsonl",
        },
    )
    return summary | {"records": records}


# --------------------------------------------------------------------------- command line

PRESET_MODEL = "lm"
"""The command line's presets of this module are ``lm-<method>``."""
COMMON_OPTIONS = frozenset(
    {
        "policy",
        "data",
        "problem_field",
        "answer_field",
        "problems",
        "seed",
        "out_dir",
        "max_steps",
        "max_step_tokens",
        "max_new_tokens",
        "separator",
        "system_prompt",
    }
)
PARTICLE_METHODS = frozenset({"pf", "epf", "gibbs"})


def math_options(method: str) -> frozenset[str]:
    """The :class:`MathRunConfig` fields (command-line options) an ``lm-<method>`` preset reads."""
    entry = MATH_METHODS[method]
    options = set(COMMON_OPTIONS)
    if not entry.budget_independent:
        options |= {"num_particles", "temperature", "selection"}
    if entry.uses_scorer:
        options |= {"prm", "aggregation"}
    if method in PARTICLE_METHODS:
        options.add("softmax_temperature")
    return frozenset(options)


def math_config(method: str, given: dict[str, Any]) -> MathRunConfig:
    """The config of ``tts-jax run lm-<method>`` from the options set on the command line.

    Unset ``problems``: every problem of ``data``; unset ``out_dir``:
    ``outputs/lm-<method>-n<N>-seed<seed>``.

    Raises:
        ValueError: an option the method does not read (naming it), or as :class:`MathRunConfig`.
    """
    if method not in MATH_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(MATH_METHODS)}")
    extra = sorted(set(given) - math_options(method))
    if extra:
        raise ValueError(
            f"{', '.join(extra)} do(es) not apply to {PRESET_MODEL}-{method}; it reads "
            f"{', '.join(sorted(math_options(method)))}"
        )
    fields = dict(given)
    if "problems" not in fields and fields.get("data"):
        count = len(
            load_problems(
                fields["data"],
                fields.get("problem_field", "problem"),
                fields.get("answer_field", "answer"),
            )
        )
        fields["problems"] = (0, count)
    if "out_dir" not in fields:
        n = 1 if MATH_METHODS[method].budget_independent else fields.get("num_particles", 8)
        fields["out_dir"] = f"outputs/{PRESET_MODEL}-{method}-n{n}-seed{fields.get('seed', 0)}"
    return MathRunConfig(method=method, **fields)

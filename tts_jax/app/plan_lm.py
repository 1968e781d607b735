"""Memory plan of step-level particle filtering of an LM with a PRM, without their weights.

``tts-jax plan --config qwen2.5-math-1.5b+prm-7b --particles 4 16 64 --max-new-tokens 2048``
answers "how many particles fit on my accelerator?" for the Puri et al. (2025) setup before any
weight is downloaded: the policy (``Qwen2ForCausalLM``) and the process reward model
(``Qwen2ForProcessRewardModel``) are built from the public transformers ``config.json`` files
shipped in ``tts_jax/assets/configs/`` (a pair folder's ``lm_pair.json`` names the two folders)
as **abstract** modules (``nnx.eval_shape``: every parameter a ``jax.ShapeDtypeStruct``), and one
step of the particle filter (:func:`tts_jax.samplers.lm.particle_filter.pf_sampler`) is
lowered and compiled on those shapes for each particle count ``N``. One step is the peak of a
run: up to ``max_step_tokens`` policy decode steps over ``N`` rows (a ``lax.while_loop``) with a
KV cache of ``P + L`` positions (prompt + ``max_new_tokens``), one PRM pass over the step's new
tokens per row against the PRM's own cache, the weights and the resampling gather of the whole
particle state (both caches included). The carry is donated, as inside the run's
``lax.scan``, so the new state aliases the old. The PRM is fed as :class:`PRMScoring` says: by
default the model-card conversation incrementally
(:class:`~tts_jax.models.lm_reward.ConversationPRMScorer`, what ``tts-jax run lm-pf`` does:
a cache of ``H + 2 L`` positions, ``2 x max_step_tokens`` tokens per update; its step encoder,
a host callback, is compiled with the real one's shapes and never run), or the policy's own
tokens (:data:`~tts_jax.models.lm_reward.cached_prm_scorer`: ``P + L`` and
``max_step_tokens``).

Next to the compiled ``memory_analysis()`` the plan gives the analytic sizes and checks them
against the compiled program:

* weights: the parameter count of the config (:func:`parameter_count`; embeddings, q/k/v with
  Qwen2's biases, o, the gated MLP, norms, an untied head or the PRM's two-layer score head)
  times the dtype's bytes, equal to the abstract module's leaves;
* KV cache per particle: ``2 x layers x kv_heads x head_dim x (P + L) x bytes`` plus the
  ``int32`` length counter (:func:`kv_cache_bytes`), equal to the cache leaves of the compiled
  step's state;
* the compiled arguments equal the (compiled, float32) weights plus the whole particle state
  (tokens, logits ``[N, vocab]`` float32, both caches, scores) plus the small decoding
  parameters, to the byte.

Assumptions behind the "fits" columns (printed with the numbers):

* The compiled **CPU** memory analysis stands in for the accelerator's. The step is compiled
  with **float32 weights** whatever ``dtype``: XLA CPU multiplies bfloat16 matrices in float32
  and keeps float32 copies of the weights among its temporaries (about twice the bf16 weights,
  32 GiB for this pair, sharing memory with the other temporaries, so neither can be read off
  the other), which a GPU or TPU does not; in float32 it makes none. The accelerator estimate
  is the weights in ``dtype`` (analytic) + the particle state (arguments minus the compiled
  weights; the output state aliases it, donated) + the compiled temporaries. Those include
  one copy of the state (the resampling gather cannot be in place), the PRM's float32
  attention logits ``[N, heads, window, P + L]`` of a layer (the plain attention materialises
  them on an accelerator too; a flash kernel would not) and activations in float32 where
  ``dtype`` would keep bfloat16, so they are an upper bound for bfloat16 weights.
* The caches have the dtype the samplers allocate today: ``float32`` for both (the policy's
  ``init_state`` and the PRM scorer's ``init`` default), whatever the weights' dtype.
  ``cache_dtype="bfloat16"`` plans the step with bfloat16 cache buffers (what a cache allocated
  in the weights' dtype would cost; the samplers do not offer it yet). Its temporaries are
  then an overestimate: with float32 weights the attention reads ``cache.astype(float32)``,
  float32 copies of the caches (the PRM's, all layers: ~280 MiB per particle at 2560
  positions) that bfloat16 weights would not make.
* Resident: both networks' weights, the particle state and one step's temporaries; the
  tokenizer and the prompt's prefill (one row, before the broadcast to ``N``) are not counted.
* Capacities: one 80 GiB GPU (A100 / H100 80GB) and one 16 GiB TPU chip (v5e), the whole of it
  (a real run keeps some for the runtime and fragmentation). The largest ``N`` that fits is read
  off the estimates interpolated linearly between the planned ``N`` (and extrapolated with the
  last segment's slope; with one planned ``N``, the segment from the weights at ``N = 0``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.lm import LM, KVCache, LMConfig, read_lm_config
from tts_jax.models.lm_reward import (
    REWARD_ARCHITECTURES,
    ConversationPRMScorer,
    PRMConversation,
    RewardModel,
    cached_prm_scorer,
)
from tts_jax.samplers.lm.particle_filter import make_pf_params, pf_sampler

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"
"""Folder of the shipped configs (one sub-folder per name)."""
LM_PLANS = ("qwen2.5-math-1.5b+prm-7b",)
"""Shipped policy + PRM pairs: folders of :data:`CONFIGS` with an :data:`PAIR_FILE`."""
PAIR_FILE = "lm_pair.json"
"""``{"policy": folder, "prm": folder}``, paths relative to the pair's folder."""
DEVICES = {"80 GiB GPU": 80 * 2**30, "16 GiB TPU": 16 * 2**30}
"""Capacities of the "fits" columns (bytes)."""
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
CAUSAL_LMS = ("Qwen2ForCausalLM", "LlamaForCausalLM")
GiB = 2**30
COMPILER_OPTIONS: dict[str, Any] = {}
"""XLA options of the compiles when none are passed (the command line passes none; the tests
set unoptimised ones, which change no number they check)."""


def _bytes(tree: Any) -> int:
    """Total bytes of the array (or ``ShapeDtypeStruct``) leaves of ``tree``."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- analytic sizes


def parameter_count(config: LMConfig, num_labels: int | None = None) -> int:
    """Parameters of the causal LM (``num_labels=None``) or of the reward model with a
    ``num_labels`` score head (:class:`~tts_jax.models.lm_reward.RewardModel`: no LM head).

    Per layer: q/k/v/o projections (q/k/v biases for Qwen2, all four with a Llama
    ``attention_bias``), the gated MLP (biases with ``mlp_bias``) and two RMSNorm weights; plus
    the embedding, the final norm and an untied LM head or the score head ``Linear(h, h)`` +
    ``Linear(h, num_labels)`` (both with biases).
    """
    c = config
    h, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attention = h * q + 2 * h * kv + q * h
    attention += (q + 2 * kv) * c.qkv_bias + h * c.o_bias
    mlp = 3 * h * f + (2 * f + h) * c.mlp_bias
    layer = attention + mlp + 2 * h
    total = c.vocab_size * h + c.num_hidden_layers * layer + h
    if num_labels is None:
        return total + (0 if c.tie_word_embeddings else c.vocab_size * h)
    return total + (h * h + h) + (h * num_labels + num_labels)


def weight_bytes(config: LMConfig, dtype: Any, num_labels: int | None = None) -> int:
    """:func:`parameter_count` times the bytes of ``dtype`` (every parameter in ``dtype``)."""
    return parameter_count(config, num_labels) * jnp.dtype(dtype).itemsize


def kv_cache_bytes(config: LMConfig, particles: int, positions: int, dtype: Any) -> int:
    """Bytes of a :class:`~tts_jax.models.lm.KVCache` of ``particles`` rows and ``positions``
    slots: ``2 x layers x kv_heads x head_dim x positions x bytes`` per row (keys and values)
    plus its ``int32`` length counter."""
    c = config
    per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * positions
    return particles * (per_row * jnp.dtype(dtype).itemsize + 4)


# --------------------------------------------------------------------------- abstract pair


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractLMPair:
    """A policy and a PRM as abstract NNX modules (``ShapeDtypeStruct`` leaves, no weights).

    Attributes:
        name: the pair's folder name.
        policy: :class:`~tts_jax.models.lm.LM`.
        prm: :class:`~tts_jax.models.lm_reward.RewardModel` (2 labels).
        dtype: the parameter dtype.
    """

    name: str
    policy: LM
    prm: RewardModel
    dtype: Any

    @property
    def policy_bytes(self) -> int:
        """Bytes of the abstract policy's parameters."""
        return _bytes(nnx.state(self.policy, nnx.Param))

    @property
    def prm_bytes(self) -> int:
        """Bytes of the abstract PRM's parameters."""
        return _bytes(nnx.state(self.prm, nnx.Param))


def _pair_folders(config: str | Path) -> tuple[str, Path, Path]:
    """``(name, policy folder, prm folder)`` of a shipped pair name or a pair folder."""
    folder = Path(config)
    if not (folder / PAIR_FILE).is_file():
        if str(config) not in LM_PLANS:
            raise ValueError(
                f"unknown LM plan config {config!r}: neither a shipped pair {LM_PLANS} nor a "
                f"folder with {PAIR_FILE}"
            )
        folder = CONFIGS / str(config)
    pair = json.loads((folder / PAIR_FILE).read_text("utf-8"))
    missing = [k for k in ("policy", "prm") if not isinstance(pair.get(k), str)]
    if missing:
        raise ValueError(
            f"{folder / PAIR_FILE}: needs string fields 'policy' and 'prm', {missing} missing"
        )
    return folder.name, (folder / pair["policy"]).resolve(), (folder / pair["prm"]).resolve()


def abstract_pair(config: str | Path, dtype: Any = jnp.bfloat16) -> AbstractLMPair:
    """The abstract policy and PRM of a shipped pair (a name of :data:`LM_PLANS`) or of a folder
    with an ``lm_pair.json`` naming a causal-LM folder and a ``Qwen2ForProcessRewardModel``
    folder (their ``config.json`` only; weights, if any, are not read).

    Raises:
        ValueError: an unknown name, a bad ``lm_pair.json``, a policy that is not a causal LM,
            a PRM that is not a 2-label process reward model, or a config our classes refuse.
        FileNotFoundError: a named folder or its ``config.json`` is missing.
    """
    name, policy_dir, prm_dir = _pair_folders(config)
    _, policy_config = read_lm_config(policy_dir, CAUSAL_LMS, loader="plan (policy)")
    arch, prm_config = read_lm_config(prm_dir, REWARD_ARCHITECTURES, loader="plan (PRM)")
    labels = REWARD_ARCHITECTURES[arch]
    if labels != 2:
        raise ValueError(
            f"plan (PRM): {prm_dir} is a {arch} ({labels} output); the particle filter's step "
            "scorer needs a 2-label Qwen2ForProcessRewardModel"
        )
    policy = nnx.eval_shape(lambda: LM(policy_config, rngs=nnx.Rngs(0), dtype=dtype))
    prm = nnx.eval_shape(lambda: RewardModel(prm_config, labels, rngs=nnx.Rngs(0), dtype=dtype))
    return AbstractLMPair(name, policy, prm, dtype)


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class LMPlanRow:
    """The compiled memory of one particle-filter step at one particle count.

    Attributes:
        particles: ``N``.
        argument_bytes, output_bytes, temp_bytes, alias_bytes: ``memory_analysis()`` fields of
            the compiled step (arguments: weights, the particle state, decoding parameters;
            the state is donated, so ``alias_bytes`` is about its size).
        state_bytes: the abstract particle state (the step's carry: tokens, logits, both
            caches, scores, weights of the SMC engine).
        input_bytes: every input of the step (keys, carry, parameters with the weights), what
            the compiled arguments should equal (``keep_unused``).
        compiled_weight_bytes: the weights among the compiled arguments (float32).
        policy_kv_bytes, prm_kv_bytes: the cache leaves of the abstract state.
        compile_seconds: lowering plus compiling.
    """

    particles: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    state_bytes: int
    input_bytes: int
    policy_kv_bytes: int
    prm_kv_bytes: int
    compiled_weight_bytes: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased bytes (the compiled CPU program's peak as
        XLA counts it, with float32 weights)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def _cast_caches(state: Any, dtype: Any) -> Any:
    """The abstract carry with the key/value buffers of both caches in ``dtype``."""

    def cast(cache: KVCache) -> KVCache:
        k = tuple(jax.ShapeDtypeStruct(x.shape, dtype) for x in cache.k)
        v = tuple(jax.ShapeDtypeStruct(x.shape, dtype) for x in cache.v)
        return cache._replace(k=k, v=v)

    particles = state.smc.particles
    lm = particles.state
    lm = lm._replace(
        cache=cast(lm.cache),
        scorer_state=lm.scorer_state._replace(cache=cast(lm.scorer_state.cache)),
    )
    return state._replace(smc=state.smc._replace(particles=particles._replace(state=lm)))


def _caches(state: Any) -> tuple[KVCache, KVCache]:
    lm = state.smc.particles.state
    return lm.cache, lm.scorer_state.cache


def _shape_only_encoder(completion, step_ends, fed, length, room, width):
    """A :data:`~tts_jax.models.lm_reward.StepEncoder` with the shapes of the real one (a host
    function behind ``jax.pure_callback``, opaque to XLA as the tokenizers' round trip is) that
    is compiled, never run: the plan has no tokenizers."""
    n = completion.shape[0]
    shapes = (
        jax.ShapeDtypeStruct((n, width), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    return jax.pure_callback(
        _never_run, shapes, completion, step_ends, fed, length, room, vmap_method="sequential"
    )


def _never_run(*args):
    raise RuntimeError("the memory plan's step encoder is compiled, never run")


@dataclasses.dataclass(frozen=True)
class PRMScoring:
    """How the planned particle filter feeds its PRM (a value: :data:`PRM_SCORINGS` names the
    two of the command line).

    Attributes:
        conversation: ``True``: the model-card conversation fed incrementally
            (:class:`~tts_jax.models.lm_reward.ConversationPRMScorer`, the math runner's default
            ``prm_scoring="incremental"``): its cache holds the conversation head (planned as
            long as the policy prompt) plus ``token_ratio x max_new_tokens`` positions and an
            update reads ``token_ratio x max_step_tokens`` tokens per particle; ``False``: the
            policy's own tokens (:data:`~tts_jax.models.lm_reward.cached_prm_scorer`), a cache
            of prompt + ``max_new_tokens`` and a window of ``max_step_tokens``.
        token_ratio: the conversation scorer's bound on PRM tokens per policy token.
    """

    conversation: bool = True
    token_ratio: int = 2

    def __post_init__(self):
        if self.token_ratio < 1:
            raise ValueError(f"prm token_ratio must be >= 1, got {self.token_ratio}")

    @property
    def name(self) -> str:
        return f"conversation (token ratio {self.token_ratio})" if self.conversation else "cached"

    def positions(self, prompt_length: int, max_new_tokens: int) -> int:
        """Slots of the PRM's cache per particle."""
        return prompt_length + (self.token_ratio if self.conversation else 1) * max_new_tokens

    def window(self, max_step_tokens: int) -> int:
        """PRM tokens read per particle and update."""
        return (self.token_ratio if self.conversation else 1) * max_step_tokens

    def scorer(self):
        """The step scorer (memoized per token ratio: one compile per value)."""
        return _conversation_scorer(self.token_ratio) if self.conversation else cached_prm_scorer

    def scorer_params(self, prm: RewardModel, prompt_length: int):
        """The scorer's ``scorer_params``: the PRM, or a :class:`PRMConversation` whose head has
        ``prompt_length`` tokens."""
        if not self.conversation:
            return prm
        head = jnp.zeros((prompt_length,), jnp.int32)
        return PRMConversation(prm, head, jnp.int32(prompt_length), jnp.int32(0))


@functools.cache
def _conversation_scorer(token_ratio: int) -> ConversationPRMScorer:
    return ConversationPRMScorer(_shape_only_encoder, token_ratio)


PRM_SCORINGS = {"conversation": PRMScoring(True), "cached": PRMScoring(False)}
"""The PRM feedings of the command line (``--prm-token-ratio`` sets the conversation's)."""


def pf_step_inputs(
    pair: AbstractLMPair,
    particles: int,
    prompt_length: int,
    max_new_tokens: int,
    max_step_tokens: int,
    cache_dtype: Any = jnp.float32,
    scoring: PRMScoring = PRMScoring(),
):
    """``(sampler, keys, carry, params)``: the particle filter's
    :class:`~tts_jax.samplers.base.Sampler` and the abstract inputs of its ``step`` (the carry
    from ``jax.eval_shape`` of the sampler's ``init``, its caches in ``cache_dtype``;
    ``params`` holds ``pair``'s modules as they are). The scorer is ``scoring``'s,
    aggregation ``last``, Puri weights and multinomial resampling (the data of
    :class:`~tts_jax.samplers.lm.particle_filter.PFParams` changes no shape)."""
    max_steps = max(1, math.ceil(max_new_tokens / max_step_tokens))
    sampler = pf_sampler(
        particles, max_steps, max_step_tokens, max_new_tokens, scoring.scorer(), "last"
    )
    prompt = jnp.zeros((prompt_length,), jnp.int32)
    scorer_params = scoring.scorer_params(pair.prm, prompt_length)
    params = make_pf_params(
        pair.policy, prompt, scorer_params, max_new_tokens=max_new_tokens, sep_id=0, stop_ids=[1]
    )
    key = jax.random.key(0)
    carry = jax.eval_shape(sampler.init, key, params)
    if jnp.dtype(cache_dtype) != jnp.float32:
        carry = _cast_caches(carry, cache_dtype)
    keys = jax.ShapeDtypeStruct((sampler.keys_per_step,), key.dtype)
    return sampler, keys, carry, params


def _input_bytes(keys: Any, carry: Any, params: Any) -> int:
    """Bytes of the step's inputs (a PRNG key counts its ``uint32[2]`` data)."""

    def size(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return int(np.prod(x.shape)) * 8
        return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize

    return sum(size(x) for x in jax.tree.leaves((keys, carry, params)))


def compile_pf_step(
    pair: AbstractLMPair,
    particles: int,
    prompt_length: int,
    max_new_tokens: int,
    max_step_tokens: int,
    *,
    cache_dtype: Any = jnp.float32,
    scoring: PRMScoring = PRMScoring(),
    compiler_options: dict[str, Any] | None = None,
) -> LMPlanRow:
    """Lower and compile one particle-filter step for ``particles`` rows on abstract weights
    (carry donated, unused inputs kept); its :class:`LMPlanRow`."""
    start = time.perf_counter()
    sampler, keys, carry, params = pf_step_inputs(
        pair, particles, prompt_length, max_new_tokens, max_step_tokens, cache_dtype, scoring
    )
    jitted = jax.jit(sampler.step, donate_argnums=1, keep_unused=True)
    options = COMPILER_OPTIONS if compiler_options is None else compiler_options
    compiled = jitted.lower(keys, carry, params).compile(dict(options))
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    policy_cache, prm_cache = _caches(carry)
    return LMPlanRow(
        particles=particles,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        state_bytes=_input_bytes((), carry, ()),
        input_bytes=_input_bytes(keys, carry, params),
        policy_kv_bytes=_bytes(policy_cache),
        prm_kv_bytes=_bytes(prm_cache),
        compiled_weight_bytes=pair.policy_bytes + pair.prm_bytes,
        compile_seconds=seconds,
    )


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LMMemoryPlan:
    """:func:`memory_plan_lm`'s result: the pair (in the planned dtype), the conditions and one
    row per ``N`` (compiled with float32 weights)."""

    pair: AbstractLMPair
    prompt_length: int
    max_new_tokens: int
    max_step_tokens: int
    dtype: str
    cache_dtype: str
    scoring: PRMScoring
    rows: tuple[LMPlanRow, ...]
    seconds: float

    @property
    def positions(self) -> int:
        """The policy's cache slots per row: prompt + ``max_new_tokens``."""
        return self.prompt_length + self.max_new_tokens

    @property
    def prm_positions(self) -> int:
        """The PRM's cache slots per row (:meth:`PRMScoring.positions`)."""
        return self.scoring.positions(self.prompt_length, self.max_new_tokens)

    @property
    def policy_weight_bytes(self) -> int:
        return weight_bytes(self.pair.policy.config, self.pair.dtype)

    @property
    def prm_weight_bytes(self) -> int:
        return weight_bytes(self.pair.prm.config, self.pair.dtype, self.pair.prm.num_labels)

    @property
    def weight_bytes(self) -> int:
        return self.policy_weight_bytes + self.prm_weight_bytes

    def kv_bytes(self, particles: int) -> tuple[int, int]:
        """Analytic ``(policy, PRM)`` cache bytes for ``particles`` rows."""
        dtype = DTYPES[self.cache_dtype]
        return (
            kv_cache_bytes(self.pair.policy.config, particles, self.positions, dtype),
            kv_cache_bytes(self.pair.prm.config, particles, self.prm_positions, dtype),
        )

    def checks(self) -> dict[str, bool]:
        """The analytic sizes against the abstract modules and the compiled program: weights =
        the modules' parameter leaves; KV = the step state's cache leaves (every row);
        compiled arguments = every input of the step (weights, state, parameters)."""
        rows = self.rows
        return {
            "weights": self.weight_bytes == self.pair.policy_bytes + self.pair.prm_bytes,
            "kv": all(
                self.kv_bytes(r.particles) == (r.policy_kv_bytes, r.prm_kv_bytes) for r in rows
            ),
            "arguments": all(r.argument_bytes == r.input_bytes for r in rows),
        }

    def accelerator_bytes(self, row: LMPlanRow) -> int:
        """Estimated bytes on an accelerator: the weights in the planned dtype + the particle
        state (the compiled arguments without their float32 weights; the new state aliases it)
        + the compiled temporaries (module docstring)."""
        state = row.argument_bytes - row.compiled_weight_bytes + row.output_bytes - row.alias_bytes
        return self.weight_bytes + state + row.temp_bytes

    def fits(self, row: LMPlanRow, capacity: int) -> bool:
        return self.accelerator_bytes(row) <= capacity

    def _points(self) -> list[tuple[int, int]]:
        """``(N, estimate)`` of the planned rows by ``N`` (with one row, the weights at
        ``N = 0`` first)."""
        points = sorted({(r.particles, self.accelerator_bytes(r)) for r in self.rows})
        return [(0, self.weight_bytes), *points] if len(points) == 1 else points

    def estimate_at(self, particles: int) -> Fraction:
        """The estimate at any ``N``: linear between the planned ``N``, the first and last
        segments extended beyond them (exact at a planned ``N``)."""
        points = self._points()
        i = sum(n <= particles for n, _ in points[1:-1])  # the segment holding ``particles``
        (n0, e0), (n1, e1) = points[i], points[i + 1]
        return e0 + Fraction((e1 - e0) * (particles - n0), n1 - n0)

    def max_particles(self, capacity: int) -> int:
        """The largest ``N`` such that :meth:`estimate_at` every ``1 <= m <= N`` fits
        ``capacity`` bytes (0: not one particle; the weights alone may not fit). A planned
        ``N`` counts as fitting exactly when its row :meth:`fits`; beyond the largest planned
        ``N`` the last segment is extended (if it does not grow, the largest planned ``N``)."""
        points = self._points()
        last = points[-1][0]
        for n in range(1, last + 1):
            if self.estimate_at(n) > capacity:
                return n - 1
        (n0, e0), (n1, e1) = points[-2:]
        if e1 <= e0:
            return last
        return last + (capacity - e1) * (n1 - n0) // (e1 - e0)

    def markdown(self) -> str:
        """The plan as markdown: the analytic sizes, a table with one row per ``N``, the largest
        ``N`` per device and the assumptions."""
        p, q = self.pair.policy.config, self.pair.prm.config
        kv1 = self.kv_bytes(1)
        size = jnp.dtype(DTYPES[self.cache_dtype]).itemsize
        checks = self.checks()
        ok = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
        lines = [
            f"**{self.pair.name}**, {self.dtype} weights, {self.cache_dtype} KV caches, prompt "
            f"{self.prompt_length} + {self.max_new_tokens} new tokens = {self.positions} cache "
            f"positions; one particle-filter step (<= {self.max_step_tokens} policy decode steps, "
            f"a PRM pass over {self.scoring.window(self.max_step_tokens)} tokens per particle, "
            f"resampling); PRM fed {self.scoring.name}, its cache {self.prm_positions} "
            f"positions; planned in {self.seconds:.0f} s.",
            "",
            f"Weights (GiB): policy {self.policy_weight_bytes / GiB:.2f} "
            f"({parameter_count(p) / 1e9:.2f} B parameters), PRM "
            f"{self.prm_weight_bytes / GiB:.2f} ({parameter_count(q, 2) / 1e9:.2f} B).",
            f"KV cache per particle (MiB), 2 x layers x kv_heads x head_dim x positions x bytes: "
            f"policy 2 x {p.num_hidden_layers} x {p.num_key_value_heads} x {p.head_dim} x "
            f"{self.positions} x {size} = {kv1[0] / 2**20:.1f}, PRM 2 x {q.num_hidden_layers} x "
            f"{q.num_key_value_heads} x {q.head_dim} x {self.prm_positions} x {size} = "
            f"{kv1[1] / 2**20:.1f}.",
            f"Analytic sizes equal the abstract modules / compiled step: {ok}.",
            *(
                [
                    f"The PRM cache is allocated for {self.prm_positions} positions, beyond its "
                    f"max_position_embeddings {q.max_position_embeddings} (a bound: about "
                    f"{self.positions} plus a marker per step are written)."
                ]
                if self.prm_positions > q.max_position_embeddings
                else []
            ),
            "",
            "| N | weights (GiB) | policy KV (GiB) | PRM KV (GiB) | other state (GiB) "
            "| temporaries (GiB) | accelerator estimate (GiB) | "
            + " | ".join(f"fits {d}" for d in DEVICES)
            + " | compile (s) |",
            "|---" * (8 + len(DEVICES)) + "|",
        ]
        for r in self.rows:
            fits = " | ".join("yes" if self.fits(r, cap) else "no" for cap in DEVICES.values())
            other = r.state_bytes - r.policy_kv_bytes - r.prm_kv_bytes
            lines.append(
                f"| {r.particles} | {self.weight_bytes / GiB:.2f} "
                f"| {r.policy_kv_bytes / GiB:.2f} | {r.prm_kv_bytes / GiB:.2f} "
                f"| {other / GiB:.2f} | {r.temp_bytes / GiB:.2f} "
                f"| {self.accelerator_bytes(r) / GiB:.2f} | {fits} | {r.compile_seconds:.0f} |"
            )
        largest = ", ".join(f"{d} {self.max_particles(c)}" for d, c in DEVICES.items())
        lines += [
            "",
            f"Largest N that fits: {largest} (estimates interpolated between the planned N, "
            "extrapolated linearly; 0: not one particle, the weights alone may not fit).",
            "",
            "Assumptions: the CPU compile stands in for the accelerator's, with float32 weights "
            "(XLA CPU would add float32 copies of bfloat16 weights that a GPU / TPU does not "
            "make); estimate = weights in the planned dtype + particle state (donated, updated "
            "in place) + the compiled temporaries (one copy of the state for the resampling "
            "gather, the PRM's float32 attention logits of one layer, activations in float32: "
            "an upper bound for bfloat16). KV caches are "
            f"{self.cache_dtype} (the samplers allocate float32 caches today)"
            + (
                "; the temporaries include float32 copies of the bfloat16 caches the float32 "
                "compile reads (an overestimate)"
                if self.cache_dtype != "float32"
                else ""
            )
            + ". Capacities are whole devices (no runtime reserve).",
        ]
        return "\n".join(lines)


def memory_plan_lm(
    config: str | Path,
    particles: Sequence[int] = (4, 16, 64),
    max_new_tokens: int = 2048,
    dtype: str = "bfloat16",
    *,
    prompt_length: int = 512,
    max_step_tokens: int = 256,
    cache_dtype: str = "float32",
    scoring: PRMScoring = PRMScoring(),
    compiler_options: dict[str, Any] | None = None,
) -> LMMemoryPlan:
    """Compile one particle-filter step of the abstract pair ``config`` for each ``N``.

    Args:
        config: a name of :data:`LM_PLANS` or a folder with an ``lm_pair.json``.
        particles: the particle counts ``N`` (positive).
        max_new_tokens: ``L``, the completion buffer (the caches hold ``prompt_length + L``).
        dtype: weights' dtype, ``"bfloat16"`` or ``"float32"``.
        prompt_length: ``P``, prompt tokens (chat template + problem; ~512 for MATH).
        max_step_tokens: token limit of one step, also the PRM's window per step (the math
            runner's default 256).
        cache_dtype: dtype of both KV caches (``"float32"``: what the samplers allocate).
        scoring: how the PRM is fed (default: the model-card conversation, incrementally, with
            a token ratio of 2, as the math runner does).
        compiler_options: passed to XLA's ``compile``.

    Raises:
        ValueError: an unknown config, a dtype that is not one of :data:`DTYPES`, no or a
            non-positive particle count, non-positive lengths, or ``prompt_length +
            max_new_tokens`` beyond the policy's ``max_position_embeddings`` (or the PRM's,
            fed the policy's tokens; the conversation's cache is a bound, noted in the table).
    """
    for name, value in (("dtype", dtype), ("cache_dtype", cache_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {tuple(DTYPES)}, got {value!r}")
    counts = tuple(int(n) for n in particles)
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"particles must be positive particle counts, got {tuple(particles)}")
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("prompt_length", prompt_length),
        ("max_step_tokens", max_step_tokens),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    start = time.perf_counter()
    pair = abstract_pair(config, DTYPES[dtype])
    compiled = pair if dtype == "float32" else abstract_pair(config, jnp.float32)
    positions = prompt_length + max_new_tokens
    checked = [("policy", pair.policy)] + ([] if scoring.conversation else [("PRM", pair.prm)])
    for role, model in checked:
        limit = model.config.max_position_embeddings
        if positions > limit:
            raise ValueError(
                f"prompt_length + max_new_tokens = {positions} exceeds the {role}'s "
                f"max_position_embeddings = {limit}"
            )
    rows = tuple(
        compile_pf_step(
            compiled,
            n,
            prompt_length,
            max_new_tokens,
            max_step_tokens,
            cache_dtype=DTYPES[cache_dtype],
            scoring=scoring,
            compiler_options=compiler_options,
        )
        for n in counts
    )
    seconds = time.perf_counter() - start
    return LMMemoryPlan(
        pair,
        prompt_length,
        max_new_tokens,
        max_step_tokens,
        dtype,
        cache_dtype,
        scoring,
        rows,
        seconds,
    )

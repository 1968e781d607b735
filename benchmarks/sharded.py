"""Sharded particles: FK steering and token-level SMC with the particle axis split over 8 host
devices, checked against the unsharded runs, and the collectives that resampling adds.

* **Same results.** Each sampler's jitted program runs twice with the same key: as is, and with
  its particle outputs constrained to a 1-D mesh of 8 devices
  (:func:`tts_jax.sharding.constrain_particles`). The samplers create their particles inside the
  program (initial noise, prompt prefill), so there is no input to place; XLA propagates the output
  sharding back through the SMC loop, whose carry then holds N/8 rows per device. FK steering is
  its public kernel, ``tts_jax.samplers.run(key, fk_steering.sampler(...), params)``, jitted as
  is; token SMC is its public kernel too, ``run(key, token_smc.token_smc_sampler(...), params)``
  (its convenience wrapper adds host-side checks, which cannot run under an outer jit).
* **Collectives.** Every all-gather / all-reduce / all-to-all / collective-permute /
  reduce-scatter in the compiled sharded HLO, attributed to the innermost ``tts_jax`` frame of its
  stack-frame metadata, with the bytes of its result and when it runs: in the resampling branch
  (only at steps that resample), at every step, or once.
* **Time.** Median wall time of the compiled programs after a warm-up, sharded and unsharded
  calls alternating; compile time apart. Then one SMC weighting step (increment, log-sum-exp
  normalisation, ESS) with and without resampling (systematic ancestors, gather of the whole
  particle state), looped 50 times in one program, sharded and unsharded: the difference isolates
  what resampling's collectives cost.

On CPU the 8 "devices" are threads sharing the machine's cores, so the sharded times measure the
overhead of partitioning and collectives, not a speedup.

Run: ``python -m benchmarks.sharded``.
"""

from __future__ import annotations

import os

# Before JAX is imported: 8 host devices.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

import collections  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from benchmarks.timing import interleaved  # noqa: E402
from tts_jax import interpolants as I  # noqa: E402
from tts_jax import smc  # noqa: E402
from tts_jax.models import gmm as G  # noqa: E402
from tts_jax.models import lm  # noqa: E402
from tts_jax.particles import ess, gather, log_normalize  # noqa: E402
from tts_jax.resampling import systematic  # noqa: E402
from tts_jax.rewards.analytic import linear_reward  # noqa: E402
from tts_jax.samplers import run  # noqa: E402
from tts_jax.samplers.image import fk_steering as fk  # noqa: E402
from tts_jax.samplers.lm import token_smc  # noqa: E402
from tts_jax.samplers.lm.state import decode_config, init_state  # noqa: E402
from tts_jax.sharding import (  # noqa: E402
    PARTICLE_AXIS,
    constrain_particles,
    particle_mesh,
    shard_particles,
)

DEVICES = 8
FK_N, FK_STEPS = 1024, 50
LM_N, LM_TOKENS = 64, 32
LOOP_STEPS = 50
REPEATS = 15
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}


# ------------------------------------------------------------------------------------------------
# The two sampler programs
# ------------------------------------------------------------------------------------------------
def fk_program():
    """FK steering on the exact 2-D GMM, linear reward, ``diff`` potential; schedule is traced."""
    sampler = fk.sampler(FK_N, FK_STEPS, potential="diff", resampler="multinomial")

    def program(key, model, reward, grid, diffusion, lam, schedule):
        return run(key, sampler, fk.Params(model, reward, grid, diffusion, lam, schedule))

    gmm = G.asymmetric_gmm_2d()
    args = (
        jax.random.key(0),
        G.flow_model(gmm),
        linear_reward([1.0, -0.5]),
        I.uniform_grid(FK_STEPS),
        I.diffusion("square", 3.0),
        jnp.float32(2.0),
    )
    return program, args


def tilt(lam, tokens, lengths, done):
    """Token-SMC twist: ``lam`` times the number of even tokens so far."""
    written = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return lam * jnp.sum((tokens % 2 == 0) & written, axis=1).astype(jnp.float32)


def tiny_lm() -> lm.LM:
    config = lm.LMConfig(
        model_type="qwen2",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return lm.LM(config, rngs=nnx.Rngs(0))


def token_smc_program(model: lm.LM):
    """Token-level SMC on a tiny random Qwen2, no stop token, ESS-triggered systematic
    resampling."""

    sampler = token_smc.token_smc_sampler(LM_N, LM_TOKENS, tilt, None, "systematic")

    def program(key, model, prompt, cfg, potential_params, ess_threshold):
        params = token_smc.TokenSMCParams(model, prompt, cfg, ess_threshold, potential_params)
        return run(key, sampler, params)

    cfg = decode_config(1.0, None, None)
    args = (
        jax.random.key(0),
        model,
        jnp.arange(1, 9, dtype=jnp.int32),
        cfg,
        jnp.float32(1.0),
        jnp.float32(0.5),
    )
    return program, args


def plain_and_sharded(program, num_particles, mesh):
    """The program jitted as is, and with its particle outputs split over ``mesh``."""
    sharded = lambda *args: constrain_particles(program(*args), mesh, num_particles)
    return jax.jit(program), jax.jit(sharded)


def compile_timed(jitted, args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def alternating_medians(calls, repeats=REPEATS):
    """Median seconds of each ``fn(*args)`` in ``calls``, alternating, after one warm-up each."""
    fns = {i: functools.partial(fn, *args) for i, (fn, args) in enumerate(calls)}
    med, _ = interleaved(fns, rounds=repeats, budget=0.0, min_reps=1)
    return [med[i] for i in fns]


# ------------------------------------------------------------------------------------------------
# Collectives in the compiled HLO, attributed to source frames
# ------------------------------------------------------------------------------------------------
def _hlo_table(hlo: str, name: str) -> dict[int, str]:
    block = re.search(rf"^{name}\n((?:\d+ .*\n)+)", hlo, re.M)
    return dict(
        (int(i), body) for i, body in (line.split(" ", 1) for line in block.group(1).splitlines())
    )


def _fields(body: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", body)}


def stack_frames(hlo: str):
    """A function ``frame id -> [(function, file:line), ...]`` (innermost first) reading the
    stack-frame tables of an HLO module's text."""
    files = {i: b.strip('"').rsplit("/", 1)[-1] for i, b in _hlo_table(hlo, "FileNames").items()}
    funcs = {i: b.strip('"') for i, b in _hlo_table(hlo, "FunctionNames").items()}
    locs = {i: _fields(b) for i, b in _hlo_table(hlo, "FileLocations").items()}
    frames = {i: _fields(b) for i, b in _hlo_table(hlo, "StackFrames").items()}

    def chain(frame_id):
        out = []
        while frame_id in frames and len(out) < len(frames):
            loc = locs[frames[frame_id]["file_location_id"]]
            out.append(
                (funcs[loc["function_name_id"]], f"{files[loc['file_name_id']]}:{loc['line']}")
            )
            frame_id = frames[frame_id]["parent_frame_id"] - 1  # 1-based, 0 = no parent
        return out

    return chain


def _bytes(shape_text: str) -> int:
    return sum(
        DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text)
    )


class Collective(NamedTuple):
    """One collective of a compiled program, attributed to its innermost ``tts_jax`` frame."""

    op: str
    function: str
    location: str
    when: str  # "resampling branch" | "every step" | "once"
    result_bytes: int


def _attribute(chain) -> tuple[str, str, str]:
    """``(function, file:line, when)`` of a collective's stack: the innermost named function, and
    whether it runs in the SMC engine's resampling branch, at every step, or once."""
    engine = [f for f, where in chain if where.startswith("smc.py:")]
    if any(f.endswith("<locals>.resample") for f in engine):
        when = "resampling branch"
    elif any(f.endswith("<locals>.body") for f in engine):
        when = "every step"
    else:
        when = "once"
    if not chain:
        return "(no source metadata)", "?:0", when
    func, where = next(((f, w) for f, w in chain if "<lambda>" not in f), chain[0])
    return func.split(".<locals>.")[-1], where, when


def collectives(hlo: str) -> list[Collective]:
    """Every collective op of a compiled HLO module (its text with stack-frame tables)."""
    chain = stack_frames(hlo)
    pattern = (
        rf"= (\(.*?\)|\S+) ({'|'.join(COLLECTIVES)})(?:-start)?\("
        r"(?:.*?stack_frame_id=(\d+))?"
    )
    return [
        Collective(op, *_attribute(chain(int(frame or 0))), _bytes(shape))
        for shape, op, frame in re.findall(pattern, hlo)
    ]


def _op_counts(found: list[Collective]) -> str:
    counts = collections.Counter(c.op for c in found)
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "none"


# ------------------------------------------------------------------------------------------------
# One weighting step, with and without resampling
# ------------------------------------------------------------------------------------------------
def weighting_loop(key, state, increments, resample):
    """``LOOP_STEPS`` x (add a log-weight increment, normalise, ESS[, resample and gather])."""
    n = increments.shape[1]

    def body(carry, k):
        state, lw, ess_sum = carry
        lw = log_normalize(lw + increments[k])
        ess_sum = ess_sum + ess(lw)
        if resample:
            state, lw = gather((state, lw), systematic(jax.random.fold_in(key, k), lw, n))
        return (state, lw, ess_sum), None

    lw0 = jnp.zeros((n,), jnp.float32)
    (state, lw, ess_sum), _ = jax.lax.scan(body, (state, lw0, 0.0), jnp.arange(LOOP_STEPS))
    return state, lw, ess_sum


def weighting_programs(state, n, mesh):
    """``{(resample, sharded): (compiled, args)}`` for one particle state."""
    increments = jax.random.normal(jax.random.key(1), (LOOP_STEPS, n))
    out = {}
    for resample in (False, True):
        loop = functools.partial(weighting_loop, resample=resample)
        plain = jax.jit(loop)
        sharded = jax.jit(lambda *args, f=loop: constrain_particles(f(*args), mesh, n))
        sharded_args = (
            jax.random.key(2),
            shard_particles(state, mesh),
            jax.device_put(increments, NamedSharding(mesh, PartitionSpec(None, PARTICLE_AXIS))),
        )
        plain_args = (jax.random.key(2), state, increments)
        out[resample, False] = (plain.lower(*plain_args).compile(), plain_args)
        out[resample, True] = (sharded.lower(*sharded_args).compile(), sharded_args)
    return out


def fk_state(n):
    """A particle state with the shapes of FK steering's on the 2-D GMM."""
    x = jax.random.normal(jax.random.key(3), (n, 2))
    zeros = jnp.zeros((n,), jnp.float32)
    return {
        "x": x,
        "u": x,
        "phi": zeros,
        "running": zeros,
        "reward": zeros,
        "nan": jnp.zeros((n,), jnp.int32),
    }


def lm_state(model, n):
    """Token SMC's :class:`~tts_jax.samplers.lm.state.LMState` (KV cache included)."""
    make = jax.jit(init_state, static_argnums=(2, 3))
    return make(model, jnp.arange(1, 9, dtype=jnp.int32), n, LM_TOKENS, jnp.int32(0))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _sharding_text(x) -> str:
    shard = x.addressable_shards[0].data.shape
    return f"`{x.sharding.spec}` on {len(x.sharding.device_set)} devices, shard {shard}"


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def equality_row(name, plain, sharded, samples_field):
    a, b = getattr(plain, samples_field), getattr(sharded, samples_field)
    if samples_field == "tokens":
        samples = f"tokens equal: {np.array_equal(a, b)}"
    else:
        samples = f"max abs diff {_max_diff(a, b):.1e}"
    return (
        f"| {name} | {int(plain.info.resampled.sum())} | {samples} "
        f"| {_max_diff(plain.log_weights, sharded.log_weights):.1e} "
        f"| {float(plain.log_evidence):.6f} / {float(sharded.log_evidence):.6f} "
        f"| {np.array_equal(plain.info.ancestors, sharded.info.ancestors)} "
        f"| {_sharding_text(b)} |"
    )


def print_collectives(by_program: dict[str, list[Collective]]) -> None:
    print("### Collectives in the compiled sharded programs")
    print()
    print(
        "Grouped by the innermost `tts_jax` function they come from (HLO stack-frame metadata). "
        "Result bytes: the size of the outputs; an all-gather's output is the whole array, on "
        "every device. Resampling-branch collectives run only at steps that resample. "
        "`gather` is the ancestor gather of the particle state (one all-gather per state leaf: "
        "every device receives the whole state, KV cache included, then keeps its rows); "
        "`_normalized_weights`, `_cdf` and `_search` are the resampler's log-sum-exp, cumsum "
        "and searchsorted over the weights; `resample` counts the distinct ancestors; "
        "`_reweight` is the per-step log-sum-exp normalisation and ESS. FK steering traces its "
        "last step outside the loop (`propagate_last`), so its step collectives appear twice "
        "in the program."
    )
    print()
    print("| program | when | source | collectives | result bytes |")
    print("|---|---|---|---|---|")
    order = {"resampling branch": 0, "every step": 1, "once": 2}
    for name, found in by_program.items():
        groups = collections.defaultdict(list)
        for c in found:
            groups[c.when, c.function, c.location.split(":")[0]].append(c)
        for (when, function, file), group in sorted(
            groups.items(), key=lambda g: (order[g[0][0]], g[0][1:])
        ):
            lines = ",".join(sorted({c.location.split(":")[1] for c in group}, key=int))
            print(
                f"| {name} | {when} | `{function}` ({file}:{lines}) | {_op_counts(group)} "
                f"| {sum(c.result_bytes for c in group)} |"
            )
    for name, found in by_program.items():
        print()
        parts = []
        for when in order:
            group = [c for c in found if c.when == when]
            parts.append(f"{when}: {len(group)} ({sum(c.result_bytes for c in group)} bytes)")
        print(f"{name}: {len(found)} collectives; " + ", ".join(parts) + ".")
    print()


def main() -> None:
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = particle_mesh(DEVICES)
    model = tiny_lm()
    fk_prog, fk_args = fk_program()
    lm_prog, lm_args = token_smc_program(model)
    runs = {  # name -> (program, particles, args for each schedule)
        "FK steering": (
            fk_prog,
            FK_N,
            {
                "adaptive (ESS < 0.5 N)": (*fk_args, smc.adaptive(FK_STEPS)),
                "every 5 steps": (*fk_args, smc.every(FK_STEPS, 5)),
            },
        ),
        "token SMC": (lm_prog, LM_N, {"adaptive (ESS < 0.5 N)": lm_args}),
    }

    print(
        f"{DEVICES} host devices (`--xla_force_host_platform_device_count={DEVICES}`) on "
        f"{os.cpu_count()} CPU cores, backend {jax.default_backend()}. FK steering: exact 2-D "
        f"GMM, N={FK_N}, {FK_STEPS} SDE steps, multinomial resampling. Token SMC: random "
        f"1-layer Qwen2 (hidden 16, vocabulary 32), N={LM_N}, {LM_TOKENS} new tokens, "
        f"systematic resampling. The {DEVICES} devices share the CPU cores: sharded times "
        "measure partitioning and collective overhead, not a speedup."
    )
    print()
    equality, timing, found = [], [], {}
    for name, (program, n, schedules) in runs.items():
        plain, sharded = plain_and_sharded(program, n, mesh)
        first_args = next(iter(schedules.values()))
        plain_c, plain_s = compile_timed(plain, first_args)
        sharded_c, sharded_s = compile_timed(sharded, first_args)
        found[name] = collectives(sharded_c.as_text())
        for i, (schedule, args) in enumerate(schedules.items()):
            label = f"{name}, {schedule}"
            compile_text = f"{plain_s:.1f} / {sharded_s:.1f}" if i == 0 else "same programs"
            equality.append(
                equality_row(
                    label,
                    plain_c(*args),
                    sharded_c(*args),
                    "tokens" if name == "token SMC" else "samples",
                )
            )
            t_plain, t_sharded = alternating_medians([(plain_c, args), (sharded_c, args)])
            timing.append(
                f"| {label} | {t_plain * 1e3:.1f} | {t_sharded * 1e3:.1f} "
                f"| {t_sharded / t_plain:.2f} | {compile_text} |"
            )

    print("### Sharded vs unsharded results (same key)")
    print()
    print(
        "| run | resamplings | samples | log-weights max abs diff | log Z unsharded / sharded "
        "| ancestors equal | output sharding |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(equality))
    print()
    print_collectives(found)
    print("### Wall time")
    print()
    print(f"Median of {REPEATS} calls after warm-up, sharded and unsharded alternating.")
    print()
    print(
        "| run | unsharded (ms) | sharded (ms) | sharded / unsharded "
        "| compile unsharded / sharded (s) |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(timing))
    print()
    print_weighting_steps(model, mesh)


def print_weighting_steps(model, mesh) -> None:
    print("### One weighting step, with and without resampling")
    print()
    print(
        f"{LOOP_STEPS} steps in one jitted `lax.scan`; per step: add a log-weight increment, "
        "log-sum-exp normalisation, ESS; with resampling also systematic ancestors and a "
        "gather of the whole particle state (and log-weights). Time per step: median of "
        f"{2 * REPEATS} calls, the four programs of a state alternating."
    )
    print()
    print(
        "| particle state | step | collectives (sharded) | unsharded (us) | sharded (us) "
        "| sharded / unsharded |"
    )
    print("|---|---|---|---|---|---|")
    states = {
        f"FK, N={FK_N} (6 leaves)": (fk_state(FK_N), FK_N),
        f"token SMC, N={LM_N} (LMState with KV cache)": (lm_state(model, LM_N), LM_N),
    }
    for name, (state, n) in states.items():
        programs = weighting_programs(state, n, mesh)
        keys = sorted(programs)  # (resample, sharded)
        medians = alternating_medians([programs[key] for key in keys], repeats=2 * REPEATS)
        per_step = {key: t / LOOP_STEPS * 1e6 for key, t in zip(keys, medians, strict=True)}
        found = {r: collectives(programs[r, True][0].as_text()) for r in (False, True)}
        for resample in (False, True):
            plain, sharded = per_step[resample, False], per_step[resample, True]
            ops = _op_counts(found[resample])
            step = "weighting + resampling" if resample else "weighting only"
            print(
                f"| {name} | {step} | {ops} | {plain:.1f} | {sharded:.1f} | {sharded / plain:.2f} |"
            )
        extra_plain = per_step[True, False] - per_step[False, False]
        extra_sharded = per_step[True, True] - per_step[False, True]
        ratio = f"{extra_sharded / extra_plain:.1f}" if extra_plain > 0 else "n/a (noise)"
        added = len(found[True]) - len(found[False])
        each = (extra_sharded - extra_plain) / added
        print(
            f"| {name} | resampling alone (difference) | +{added}, about {each:.0f} us each "
            f"| {extra_plain:.1f} | {extra_sharded:.1f} | {ratio} |"
        )


if __name__ == "__main__":
    main()

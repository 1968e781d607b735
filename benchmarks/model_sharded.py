"""Model sharding on a 2-D (particles x model) mesh of 8 host devices: memory and overhead.

* **Per-device memory.** A DiT forward (DiT-XL/2 width: 16 heads x 72, 4 of its 28 blocks,
  32 x 32 latents) and a Qwen2 prefill (Qwen2-0.5B sizes: width 896, MLP 4864, 2 KV heads,
  vocabulary 151936, 4 of its 24 layers, 32 tokens; but 16 query heads of 56 instead of 14 of
  64, since 14 heads do not split 4 or 8 ways) over 8 particles, compiled on abstract shapes (no
  weights allocated) for model-axis sizes 1, 2, 4, 8 (the particle axis takes the other devices):
  the compiled program's per-device argument bytes (the weights, split by
  :mod:`tts_jax.models.partitioning`) and temporary bytes (``memory_analysis``). The Qwen2 KV
  heads are replicated (``lm_table(shard_kv=False)``) since 2 KV heads do not split 4 or 8 ways.
* **Overhead.** Median wall time of FK steering on a small random DiT (8 particles, 8 steps):
  unsharded, then with :func:`~tts_jax.models.partitioning.shard_flow` on 8x1, 4x2 and 2x4
  meshes; the maximum difference of the samples to the unsharded run. On CPU the 8 "devices" are
  threads sharing the machine's cores, so this measures the cost of partitioning and collectives,
  not a speed-up.

Run: ``python -m benchmarks.model_sharded``.
"""

from __future__ import annotations

import os

# Before JAX is imported: 8 host devices.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.timing import time_call  # noqa: E402
from tts_jax import interpolants as I  # noqa: E402
from tts_jax import sharding, smc  # noqa: E402
from tts_jax.models import lm  # noqa: E402
from tts_jax.models import partitioning as part  # noqa: E402
from tts_jax.models.dit import DiT, DiTConfig  # noqa: E402
from tts_jax.models.lm import generation  # noqa: E402
from tts_jax.models.lm.cache import init_cache  # noqa: E402
from tts_jax.models.wrappers import velocity_dit_flow  # noqa: E402
from tts_jax.rewards.base import Reward  # noqa: E402
from tts_jax.samplers.image import fk_steering as fk  # noqa: E402

N = 8
MIB = 2**20
DIT = DiTConfig(num_attention_heads=16, attention_head_dim=72, num_layers=4, sample_size=32)
QWEN = lm.LMConfig(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=56,
)
SMALL_DIT = DiTConfig(
    num_attention_heads=8, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=16
)


def abstract_state(module: nnx.Module, mesh, table) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of an abstract module with every leaf a ``ShapeDtypeStruct`` placed as
    ``table`` says."""
    graphdef, state = nnx.split(module)
    shardings = part.state_shardings(state, mesh, table)
    flat = []
    for path, var in nnx.to_flat_state(state):
        leaf = var.get_value()
        name = ".".join(str(p) for p in path)
        flat.append(
            (
                path,
                var.replace(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[name])),
            )
        )
    return graphdef, nnx.from_flat_state(flat)


def memory_rows() -> list[str]:
    rows = []
    cases = [
        (
            "DiT-XL/2 width, 4 blocks",
            lambda: DiT(DIT, rngs=nnx.Rngs(0)),
            part.dit_table(DIT),
            (N, 4, 32, 32),
            jnp.float32,
            lambda m, x: m(x, jnp.full((N,), 500.0), jnp.zeros((N,), jnp.int32)),
        ),
        (
            "Qwen2-0.5B width, 4 layers",
            lambda: lm.LM(QWEN, rngs=nnx.Rngs(0)),
            part.lm_table(QWEN, shard_kv=False),
            (N, 32),
            jnp.int32,
            lambda m, x: generation.forward(m, x, init_cache(QWEN, N, 64))[0],
        ),
    ]
    for name, make, table, shape, dtype, forward in cases:
        module = nnx.eval_shape(make)
        for model in (1, 2, 4, 8):
            mesh = sharding.mesh(particles=8 // model, model=model)
            graphdef, state = abstract_state(module, mesh, table)
            x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("particles")))
            compiled = (
                jax.jit(lambda s, x, g=graphdef, f=forward: f(nnx.merge(g, s), x))
                .lower(state, x)
                .compile()
            )
            mem = compiled.memory_analysis()
            rows.append(
                f"| {name} | {8 // model} x {model} | {mem.argument_size_in_bytes / MIB:.1f} | "
                f"{mem.temp_size_in_bytes / MIB:.1f} |"
            )
    return rows


def brightness(params, x, cond=None):
    return params["w"] * x.mean(axis=(1, 2, 3))


def overhead_rows() -> list[str]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(SMALL_DIT, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.normal(size=a.shape), a.dtype), state)
    flow = velocity_dit_flow(nnx.merge(graphdef, state))
    reward = Reward({"w": jnp.float32(3.0)}, brightness, "brightness")
    steps = 8
    grid = jnp.linspace(1.0, 0.0, steps + 1)
    schedule = smc.every(steps, 1)

    def runner(f):
        return lambda: fk.fk_steering(
            jax.random.key(0), f, reward, N, grid, I.diffusion("square", 1.0), 4.0,
            schedule=schedule,
        ).samples  # fmt: skip

    first, median = time_call(runner(flow))
    plain = runner(flow)()
    rows = [f"| unsharded (1 device) | {first:.2f} | {median * 1e3:.1f} | 0 |"]
    for particles, model in ((8, 1), (4, 2), (2, 4)):
        sharded = part.shard_flow(flow, sharding.mesh(particles=particles, model=model))
        first, median = time_call(runner(sharded))
        diff = float(jnp.abs(runner(sharded)() - plain).max())
        rows.append(f"| {particles} x {model} | {first:.2f} | {median * 1e3:.1f} | {diff:.1e} |")
    return rows


def main() -> None:
    print("### Per-device compiled memory vs model-axis size (8 host devices, 8 particles)")
    print()
    print("| network | particles x model | arguments MiB / device | temporaries MiB / device |")
    print("|---|---|---|---|")
    print("\n".join(memory_rows()))
    print()
    print("### FK steering on a small DiT (8 particles, 8 steps): 2-D mesh vs unsharded")
    print()
    print("| mesh | first call s (compile) | median ms | max abs diff of samples |")
    print("|---|---|---|---|")
    print("\n".join(overhead_rows()))


if __name__ == "__main__":
    main()

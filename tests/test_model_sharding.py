"""Model sharding on a 2-D (particles x model) mesh: parity, real splits, FK steering, bad input.

The multi-device checks run in one subprocess with 4 host CPU devices (the XLA flag must be set
before jax starts): a (2 particles x 2 model) mesh. Tolerance: the row-parallel layers sum their
partial products across the model axis in a different order than the unsharded matmul, so
outputs agree up to float32 reassociation (<= 1e-5 relative on these O(1) activations); the
column-parallel layers, the vocabulary split and the gathers are exact.
"""

import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh

from tts_jax import sharding
from tts_jax.models import lm
from tts_jax.models import partitioning as part

from .helpers import run_on_host_devices

FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            pooled_projection_dim=20, axes_dims_rope=(2, 2, 4), guidance_embeds=True)  # fmt: skip
SD35 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            caption_projection_dim=16, pooled_projection_dim=20, pos_embed_max_size=16,
            qk_norm="rms_norm", dual_attention_layers=(0,))  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import os  # unoptimised XLA compiles ~2x faster; both sides of every comparison share it
    os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                                " --xla_llvm_disable_expensive_passes=true")
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from tts_jax import interpolants as I, smc, sharding
    from tts_jax.models import lm, partitioning as part
    from tts_jax.models.dit import DiT, DiTConfig, load_dit, save_dit
    from tts_jax.models.lm import generation
    from tts_jax.models.lm.cache import init_cache
    from tts_jax.models.wrappers import velocity_dit_flow
    from tts_jax.rewards.base import Reward
    from tts_jax.samplers.image import fk_steering as fk

    assert len(jax.devices()) == 4, jax.devices()
    mesh = sharding.mesh(particles=2, model=2)
    assert dict(mesh.shape) == {"particles": 2, "model": 2}

    def filled(make, seed, scale):
        graphdef, state = nnx.split(nnx.eval_shape(make))
        rng = np.random.default_rng(seed)
        fill = lambda leaf: jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float32)
        return nnx.merge(graphdef, jax.tree.map(fill, state))

    def split_rows(array, axis):
        # every device holds 1/2 of the split axis, and the two model shards differ
        shards = array.addressable_shards
        assert len(shards) == 4, shards
        for s in shards:
            assert s.data.shape[axis] == array.shape[axis] // 2, (s.data.shape, array.shape)
        assert len({str(s.index) for s in shards}) == 2

    # ---- LM: logits of a tiny Qwen2 (4 heads, 2 KV heads, vocabulary 8)
    config = lm.LMConfig(model_type="qwen2", vocab_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = filled(lambda: lm.LM(config, rngs=nnx.Rngs(0)), 0, 0.3)
    sharded = part.shard_model(model, mesh)
    attn, mlp = sharded.model.layers[0].self_attn, sharded.model.layers[0].mlp
    split_rows(attn.q_proj.weight[...], 0)
    split_rows(attn.k_proj.weight[...], 0)
    split_rows(attn.o_proj.weight[...], 1)
    split_rows(mlp.up_proj.weight[...], 0)
    split_rows(mlp.down_proj.weight[...], 1)
    split_rows(sharded.model.embed_tokens.weight[...], 0)
    split_rows(sharded.lm_head.weight[...], 0)
    norm = sharded.model.norm.weight[...]
    assert all(s.data.shape == norm.shape for s in norm.addressable_shards)
    # weight bytes per device: the split matrices halve, the norms are replicated
    state = nnx.state(sharded)
    total = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model)))
    norms = sum(v.nbytes for p, v in nnx.to_flat_state(nnx.state(model)) if "norm" in str(p))
    assert set(part.device_bytes(state).values()) == {(total - norms) // 2 + norms}

    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 7, 0, 1, 2]], jnp.int32)
    logits = jax.jit(lambda m, t: generation.forward(m, t, init_cache(m.model.config, 2, 8))[0])
    want, got = logits(model, tokens), logits(sharded, tokens)
    assert float(jnp.abs(want).max()) > 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # ---- DiT: velocity of a tiny DiT (2 heads)
    dcfg = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                     num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    dit = filled(lambda: DiT(dcfg, rngs=nnx.Rngs(0)), 1, 0.1)
    sdit = part.shard_model(dit, mesh)
    block = sdit.transformer_blocks[0]
    split_rows(block.attn1.to_q.kernel[...], 1)
    split_rows(block.attn1.to_out.kernel[...], 0)
    split_rows(block.ff.proj_in.kernel[...], 1)
    split_rows(block.ff.proj_out.kernel[...], 0)
    split_rows(block.norm1.linear.kernel[...], 0)
    flow, sflow = velocity_dit_flow(dit), velocity_dit_flow(sdit)
    x = jax.random.normal(jax.random.key(0), (4, *flow.sample_shape))
    t = jnp.array([0.1, 0.4, 0.7, 0.9])
    velocity = jax.jit(lambda f, x, t: f.velocity(x, t))
    want, got = velocity(flow, x, t), velocity(sflow, x, t)
    assert float(jnp.abs(want).max()) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # ---- checkpoints loaded into the split layout: staged on the host, or each device reading
    # its own slices of the safetensors files
    import pathlib, tempfile
    from safetensors.numpy import load_file, save_file
    from tts_jax.models.checkpoint import TensorMismatchError
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "dit"
        save_dit(folder, dcfg, dit)
        _, staged = part.load_sharded(lambda: load_dit(folder), mesh)
        _, sliced = part.load_dit_sharded(folder, mesh)
        for path, var in nnx.to_flat_state(nnx.state(dit)):
            for loaded in (staged, sliced):
                got = dict(nnx.to_flat_state(nnx.state(loaded)))[path].get_value()
                np.testing.assert_array_equal(got, var.get_value())
                assert got.sharding.spec == part.dit_table(dcfg).spec(
                    ".".join(map(str, path)), got.ndim), path
        split_rows(sliced.transformer_blocks[0].ff.proj_in.kernel[...], 1)
        split_rows(sliced.transformer_blocks[0].attn1.to_out.kernel[...], 0)
        lm.save_lm(pathlib.Path(tmp) / "lm", config, model)
        _, lm_sliced = part.load_lm_sharded(pathlib.Path(tmp) / "lm", mesh)
        for path, var in nnx.to_flat_state(nnx.state(model)):
            got = dict(nnx.to_flat_state(nnx.state(lm_sliced)))[path].get_value()
            np.testing.assert_array_equal(got, var.get_value())
        split_rows(lm_sliced.model.layers[0].self_attn.o_proj.weight[...], 1)
        weights = folder / "diffusion_pytorch_model.safetensors"
        tensors = load_file(weights)
        tensors.pop("proj_out_2.bias")
        save_file(tensors, weights)
        try:
            part.load_dit_sharded(folder, mesh)
        except TensorMismatchError as err:
            assert "missing tensor 'proj_out_2.bias'" in str(err), err
        else:
            raise AssertionError("a missing tensor accepted")

    # ---- FK steering on the DiT: particles over "particles", weights over "model"
    N, K = 8, 4
    grid = jnp.linspace(1.0, 0.0, K + 1)
    reward = Reward({"w": jnp.float32(3.0)}, lambda p, x, c: p["w"] * x.mean(axis=(1, 2, 3)),
                    "brightness")
    schedule = smc.every(K, 1)
    diffusion = I.diffusion("square", 1.0)
    plain = fk.fk_steering(jax.random.key(2), flow, reward, N, grid, diffusion, 4.0,
                           schedule=schedule)
    sharded_flow = part.shard_flow(flow, mesh)  # the sampler itself is unchanged
    out = fk.fk_steering(jax.random.key(2), sharded_flow, reward, N, grid, diffusion, 4.0,
                         schedule=schedule)
    net = sharded_flow.params.net[1]
    split_rows(net["transformer_blocks"][0]["attn1"]["to_k"]["kernel"][...], 1)
    assert out.samples.sharding.spec[0] == "particles", out.samples.sharding
    assert out.samples.addressable_shards[0].data.shape[0] == N // 2
    assert int(plain.info.resampled.sum()) > 0
    np.testing.assert_array_equal(out.info.ancestors, plain.info.ancestors)
    np.testing.assert_allclose(out.samples, plain.samples, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_weights, plain.log_weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_evidence, plain.log_evidence, rtol=1e-5, atol=1e-5)

    # ---- bad input: 3 heads on a model axis of 2, a split axis the model axis does not divide
    bad = lm.LMConfig(model_type="qwen2", vocab_size=8, hidden_size=12, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1)
    try:
        part.shard_model(filled(lambda: lm.LM(bad, rngs=nnx.Rngs(0)), 0, 0.1), mesh)
    except ValueError as err:
        assert "num_attention_heads=3 is not divisible by the 2 devices" in str(err), err
    else:
        raise AssertionError("3 heads split over 2 devices")
    odd = lm.LMConfig(model_type="qwen2", vocab_size=7, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    try:
        part.shard_model(filled(lambda: lm.LM(odd, rngs=nnx.Rngs(0)), 0, 0.1), mesh)
    except ValueError as err:
        assert "weight' of shape (7, 16) has axis 0 of size 7" in str(err), err
    else:
        raise AssertionError("a vocabulary of 7 split over 2 devices")
    print("MODEL-SHARDING-OK")
    """
)


def test_model_sharded_lm_dit_and_fk_steering_match_unsharded():
    run_on_host_devices(SCRIPT, 4, "MODEL-SHARDING-OK")


@pytest.mark.parametrize(
    "text, sizes",
    [
        ("particles=2,model=4", {"particles": 2, "model": 4}),
        (" model = 4 ", {"model": 4}),
        ("model=2,particles=-1", {"model": 2, "particles": -1}),
    ],
)
def test_parse_mesh(text, sizes):
    assert sharding.parse_mesh(text) == sizes


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("particles=2,model", "'model' is not name=size"),
        ("gpus=4", "unknown axis 'gpus'"),
        ("model=2,model=2", "axis 'model' given twice"),
        ("model=two", "must be an integer, got 'two'"),
        ("model=0", "must be >= 1 or -1, got 0"),
        ("particles=-1,model=-1", "at most one axis may be -1"),
    ],
)
def test_parse_mesh_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(text)


def test_mesh_sizes_must_match_the_devices():
    one = jax.devices()[:1]
    assert dict(sharding.mesh(devices=one).shape) == {"particles": 1, "model": 1}
    assert dict(sharding.mesh_from_string("model=-1", one).shape) == {"particles": 1, "model": 1}
    with pytest.raises(ValueError, match="particles=2,model=4 needs 8 devices, 1 available"):
        sharding.mesh(2, 4, devices=one)
    with pytest.raises(ValueError, match="1 devices do not split into groups of 4"):
        sharding.mesh_from_string("model=4", one)
    with pytest.raises(ValueError, match="at most one axis size may be left open"):
        sharding.mesh(None, -1, devices=one)


def test_head_counts_are_checked_against_the_model_axis():
    """Without devices: the table check reads only the mesh's axis sizes."""
    mesh = AbstractMesh((1, 8), ("particles", "model"))
    config = lm.LMConfig(
        model_type="qwen2",
        vocab_size=8,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    with pytest.raises(ValueError, match="num_key_value_heads=4 is not divisible by the 8"):
        part.check_table(part.lm_table(config), mesh)
    part.check_table(part.lm_table(config, shard_kv=False), mesh)  # KV heads replicated
    with pytest.raises(ValueError, match="num_attention_heads=16 is not divisible by the 32"):
        part.check_table(part.lm_table(config), AbstractMesh((1, 32), ("particles", "model")))
    with pytest.raises(ValueError, match="no 'model' axis"):
        part.check_table(part.lm_table(config), AbstractMesh((8,), ("particles",)))


def test_every_split_rule_of_the_shipped_tables_names_a_real_parameter():
    """A renamed module would silently leave its weights replicated: every rule of every table
    must match at least one parameter of a tiny instance of its architecture."""
    import re

    from flax import nnx

    from tts_jax.models.dit import DiT, DiTConfig
    from tts_jax.models.flux import FluxConfig, FluxTransformer
    from tts_jax.models.sd3 import SD3Config, SD3Transformer

    lm_config = lm.LMConfig(
        model_type="llama",
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
    )
    makers = [
        lambda: lm.LM(lm_config, rngs=nnx.Rngs(0)),
        lambda: DiT(DiTConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                              sample_size=8, num_embeds_ada_norm=10), rngs=nnx.Rngs(0)),
        lambda: FluxTransformer(FluxConfig(**FLUX), rngs=nnx.Rngs(0)),
        lambda: SD3Transformer(SD3Config(**SD35), rngs=nnx.Rngs(0)),
    ]  # fmt: skip
    for make in makers:
        module = nnx.eval_shape(make)
        table = part.partition_table(module)
        paths = [".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(module))]
        for rule in table.rules:
            assert any(re.fullmatch(rule.pattern, p) for p in paths), (table.name, rule)


def test_cli_mesh_option(tmp_path, monkeypatch):
    """``tts-jax run <image preset> --mesh ...``: bad strings and sizes are named errors, LM
    presets refuse it, and an image run hands the runner its bundle with the sharded flow
    (:func:`~tts_jax.models.partitioning.shard_flow`, whose FK run is checked above; the runner
    is replaced here to save a compile)."""
    from tts_jax.app import experiment
    from tts_jax.app.cli import main

    with pytest.raises(SystemExit, match="--mesh: unknown axis 'gpus'"):
        main(["run", "gmm-fk", "--mesh", "gpus=2"])
    with pytest.raises(SystemExit, match="particles=2,model=4 needs 8 devices, 1 available"):
        main(["run", "gmm-fk", "--mesh", "particles=2,model=4"])
    with pytest.raises(SystemExit, match="--mesh: image presets only for now, not arith-pf"):
        main(["run", "arith-pf", "--mesh", "model=1"])
    seen = []

    def run_one(config, bundle=None):
        seen.append(bundle)
        return {"files": []}

    monkeypatch.setattr(experiment, "run_one", run_one)
    main(["run", "gmm-fk", "--mesh", "model=1", "--out-dir", str(tmp_path)])
    (bundle,) = seen
    assert isinstance(bundle.model.apply, part.ParticleSplitApply)
    assert dict(bundle.model.apply.mesh.shape) == {"particles": 1, "model": 1}

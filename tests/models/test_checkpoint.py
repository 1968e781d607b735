"""The checkpoint IO module: sharded safetensors folders, NNX <-> flat names, clear errors.

A sharded folder (``model-0000i-of-0000K.safetensors`` + ``model.safetensors.index.json``, what
``save_pretrained`` writes for large models) must load exactly like the single-file folder; our
shards must load in transformers and transformers' shards in our loader. Mismatches name every
tensor and the shard it came from. Nothing is downloaded (tiny random configs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models import lm
from tts_jax.models.checkpoint import (
    TORCH,
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    TensorMismatchError,
    export_params,
    load_params,
    read_config,
    read_tensors,
    save_tensors,
)
from tts_jax.models.dit import DiTConfig, init_dit, load_dit, save_dit
from tts_jax.models.dit_checkpoint import save_folder as save_diffusers_folder
from tts_jax.models.lm_reward import RewardModel, load_reward_model, save_reward_model

CONFIG = lm.LMConfig(
    model_type="qwen2",
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
INDEX = "model.safetensors.index.json"
TWO_SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def _random_lm(config: lm.LMConfig = CONFIG, seed: int = 0) -> lm.LM:
    """An LM with every parameter perturbed (no bias or norm weight trivially 0 or 1)."""
    model = lm.LM(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def _two_shard_size(module: nnx.Module) -> int:
    """A ``max_shard_size`` that splits ``module``'s parameters into exactly two shards."""
    total = sum(a.nbytes for a in export_params(module).values())
    return math.ceil(0.6 * total)


def _params(module: nnx.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in export_params(module).items()}


def _logits(model: lm.LM, tokens: np.ndarray) -> np.ndarray:
    n, t = tokens.shape
    logits, _ = jax.jit(lm.forward)(model, jnp.asarray(tokens), lm.init_cache(model.config, n, t))
    return np.asarray(logits)


TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7)).astype(np.int32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(model, single-file folder, two-shard folder)`` of one tiny LM."""
    model = _random_lm()
    root = tmp_path_factory.mktemp("lm")
    lm.save_lm(root / "single", CONFIG, model)
    lm.save_lm(root / "sharded", CONFIG, model, max_shard_size=_two_shard_size(model))
    return model, root / "single", root / "sharded"


# ----------------------------------------------------------------------- sharded folders


def test_two_shards_and_an_index_are_written(folders):
    _, single, sharded = folders
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", *TWO_SHARDS, INDEX]
    index = json.loads((sharded / INDEX).read_text())
    shards = [load_file(sharded / name) for name in TWO_SHARDS]
    assert all(shards)
    assert index["weight_map"] == {t: f for f, s in zip(TWO_SHARDS, shards, strict=True) for t in s}
    total = sum(a.nbytes for s in shards for a in s.values())
    assert index["metadata"]["total_size"] == total
    assert load_file(single / "model.safetensors").keys() == index["weight_map"].keys()


def test_a_sharded_lm_loads_identically(folders):
    model, single, sharded = folders
    config_1, from_single = lm.load_lm(single)
    config_2, from_shards = lm.load_lm(sharded)
    assert config_1 == config_2 == CONFIG
    want = _params(model)
    for loaded in (from_single, from_shards):
        got = _params(loaded)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(_logits(from_shards, TOKENS), _logits(from_single, TOKENS))


def test_read_tensors_merges_the_shards(folders):
    _, single, sharded = folders
    one, merged = read_tensors(single, "t"), read_tensors(sharded, "t", "model.safetensors")
    assert one.keys() == merged.keys() and not one.origin
    assert set(merged.origin.values()) == set(TWO_SHARDS)
    for name in one:
        np.testing.assert_array_equal(merged[name], one[name])


def test_a_sharded_reward_model_loads_identically(tmp_path):
    rm = RewardModel(CONFIG, 2, rngs=nnx.Rngs(3))
    save_reward_model(tmp_path / "single", CONFIG, rm)
    save_reward_model(tmp_path / "sharded", CONFIG, rm, max_shard_size=_two_shard_size(rm))
    assert (tmp_path / "sharded" / INDEX).is_file()
    _, a = load_reward_model(tmp_path / "single")
    _, b = load_reward_model(tmp_path / "sharded")
    for name, value in _params(a).items():
        np.testing.assert_array_equal(_params(b)[name], value, err_msg=name)


def test_a_sharded_diffusers_folder_loads_identically(tmp_path):
    config = DiTConfig(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    dit = init_dit(config, 1)
    state = nnx.state(dit, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(dit, jax.tree.unflatten(treedef, noisy))
    save_dit(tmp_path / "single", config, dit)
    tensors = load_file(tmp_path / "single" / "diffusion_pytorch_model.safetensors")
    size = math.ceil(0.5 * sum(a.nbytes for a in tensors.values()))
    save_diffusers_folder(tmp_path / "sharded", config.to_dict(), tensors, max_shard_size=size)
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert "diffusion_pytorch_model.safetensors" not in names
    _, from_single = load_dit(tmp_path / "single")
    _, from_shards = load_dit(tmp_path / "sharded")
    pairs = zip(
        jax.tree.leaves(nnx.state(from_shards)),
        jax.tree.leaves(nnx.state(from_single)),
        jax.tree.leaves(nnx.state(dit)),
        strict=True,
    )
    for a, b, c in pairs:
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_saving_again_removes_the_other_layout(folders, tmp_path):
    model, _, sharded = folders
    folder = tmp_path / "resaved"
    shutil.copytree(sharded, folder)
    lm.save_lm(folder, CONFIG, model)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    lm.save_lm(folder, CONFIG, model, max_shard_size=_two_shard_size(model))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", *TWO_SHARDS, INDEX]
    (folder / "notes.safetensors.txt").write_text("kept")
    save_tensors(folder, export_params(model), "model.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.safetensors.txt",
    ]


# ----------------------------------------------------------------------- errors


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _message(load, *args) -> str:
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        load(*args)
    return str(info.value)


def test_a_missing_shard_names_the_folder_the_shard_and_the_index(folders, tmp_path):
    folder = _copy(folders[2], tmp_path)
    (folder / TWO_SHARDS[1]).unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        lm.load_lm(folder)
    message = str(info.value)
    assert f"load_lm: folder {folder} has no {TWO_SHARDS[1]}" in message and INDEX in message


def test_an_index_that_misplaces_a_tensor_is_refused(folders, tmp_path):
    folder = _copy(folders[2], tmp_path)
    index = json.loads((folder / INDEX).read_text())
    name = next(t for t, f in index["weight_map"].items() if f == TWO_SHARDS[0])
    index["weight_map"][name] = TWO_SHARDS[1]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        lm.load_lm(folder)
    message = str(info.value)
    assert f"{INDEX} in {folder}" in message and repr(name) in message and TWO_SHARDS[1] in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is invalid JSON"),
        (json.dumps({"metadata": {}}), 'lacks the required key "weight_map"'),
        (json.dumps({"weight_map": ["a"]}), '"weight_map" must be an object'),
        (json.dumps({"weight_map": {"a": 3}}), "*.safetensors files"),
        (json.dumps({"weight_map": {"a": "../x.safetensors"}}), "*.safetensors files"),
    ],
)
def test_a_broken_index_names_the_file(folders, tmp_path, content, expected):
    folder = _copy(folders[2], tmp_path)
    (folder / INDEX).write_text(content)
    with pytest.raises(CheckpointConfigError) as info:
        lm.load_lm(folder)
    assert f"load_lm: {INDEX} in {folder}" in str(info.value) and expected in str(info.value)


def test_a_mismatch_names_every_tensor_and_its_shard(folders, tmp_path):
    folder = _copy(folders[2], tmp_path)
    second = load_file(folder / TWO_SHARDS[1])
    bad, gone = sorted(second)[:2]
    second[bad] = second[bad][..., :-1]
    del second[gone]
    second["extra.weight"] = np.zeros(3, np.float32)
    save_file(second, folder / TWO_SHARDS[1])
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][gone]
    index["weight_map"]["extra.weight"] = TWO_SHARDS[1]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(TensorMismatchError) as info:
        lm.load_lm(folder)
    err = info.value
    message = str(err)
    assert message.startswith(f"load_lm: the tensors of {INDEX} in {folder} do not match")
    assert f"missing tensor {gone!r}" in message
    assert f"tensor {bad!r} (in {TWO_SHARDS[1]}) has shape" in message
    assert "unexpected tensor 'extra.weight'" in message
    assert [n for n, _ in err.missing] == [gone] and err.unexpected == ["extra.weight"]
    assert [n for n, *_ in err.misshaped] == [bad]


def test_a_tensor_in_two_files_is_refused(folders, tmp_path):
    folder = _copy(folders[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = sorted(tensors)[0]
    save_file({name: tensors[name]}, folder / "extra.safetensors")
    message = _message(lm.load_lm, folder)
    assert f"tensor {name!r} is in both" in message and str(folder) in message


# ----------------------------------------------------------------------- layouts and configs


class _Small(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 5, rngs=rngs)
        self.conv = nnx.Conv(2, 4, (3, 1), rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)


def test_torch_layout_names_and_transposes_and_round_trips():
    module = _Small(nnx.Rngs(0))
    flat = export_params(module, TORCH)
    assert {k: v.shape for k, v in flat.items()} == {
        "conv.bias": (4,),
        "conv.weight": (4, 2, 3, 1),
        "dense.bias": (5,),
        "dense.weight": (5, 3),
        "norm.bias": (5,),
        "norm.weight": (5,),
    }
    np.testing.assert_array_equal(flat["dense.weight"], np.asarray(module.dense.kernel[...]).T)
    abstract = nnx.eval_shape(lambda: _Small(nnx.Rngs(1)))
    loaded = load_params(abstract, flat, TORCH)
    for a, b in zip(
        jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(module)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    renamed = dataclasses.replace(TORCH, rename=lambda n: n.replace("dense.", "fc."))
    assert "fc.weight" in export_params(module, renamed)


def test_strict_dtype_and_casts():
    module = _Small(nnx.Rngs(0))
    flat = export_params(module)
    abstract = nnx.eval_shape(lambda: _Small(nnx.Rngs(1)))
    as_bf16 = load_params(abstract, flat, dtype=jnp.bfloat16)
    assert as_bf16.dense.kernel[...].dtype == jnp.bfloat16
    half = flat | {"dense.bias": flat["dense.bias"].astype(np.float16)}
    assert load_params(abstract, half).dense.bias[...].dtype == jnp.float32
    message = r"'dense.bias' is float16\[5\], expected float32\[5\]"
    with pytest.raises(TensorMismatchError, match=message):
        load_params(abstract, half, strict_dtype=True)


@dataclasses.dataclass(frozen=True)
class _Config:
    width: int
    name: str = "x"

    @classmethod
    def from_dict(cls, raw):
        if raw["width"] < 1:
            raise ValueError("width must be positive")
        return cls(**raw)


def test_read_config_checks_types_and_parses(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"width": 3}))
    assert read_config(tmp_path, "t", _Config.from_dict, schema=_Config) == _Config(3)
    assert read_config(tmp_path, "t") == {"width": 3}
    (tmp_path / "config.json").write_text(json.dumps({"width": "3"}))
    with pytest.raises(CheckpointConfigError, match='"width" must be an int'):
        read_config(tmp_path, "t", _Config.from_dict, schema=_Config)
    (tmp_path / "config.json").write_text(json.dumps({"name": "y"}))
    with pytest.raises(CheckpointConfigError, match='required key "width"'):
        read_config(tmp_path, "t", _Config.from_dict, schema=_Config)
    (tmp_path / "config.json").write_text(json.dumps({"width": 0}))
    with pytest.raises(CheckpointConfigError, match=f"t: config.json in {tmp_path}: width must"):
        read_config(tmp_path, "t", _Config.from_dict, schema=_Config)


def test_the_lm_package_keeps_the_names_of_the_former_module():
    names = {
        "Array", "Attention", "Backbone", "CAUSAL_LM_ARCHITECTURES", "CheckpointError",
        "DecoderLayer", "Embedding", "GenerateOutput", "HF_CONFIG_TYPES", "HF_REQUIRED_KEYS",
        "INIT_STD", "KVCache", "LM", "LMConfig", "LanguageModel", "Linear", "MLP", "RMSNorm",
        "SUPPORTED_MODEL_TYPES", "_IGNORED_SUFFIXES", "_MOE_KEYS", "_apply_rope", "_bcast",
        "_check_fits", "_default_rope_theta", "_eos_to_hf", "generate_program", "_init_cache",
        "_name", "_prefill", "_read_tensors", "_rope_tables", "as_language_model",
        "check_architecture", "decode_step", "forward", "generate", "hidden_states",
        "init_cache", "language_model", "lm_logits", "load_lm", "load_weights",
        "read_config_file", "read_lm_config", "require_files", "safetensors_errors",
        "sample_token", "save_lm", "save_weights",
    }  # fmt: skip
    assert not names - set(dir(lm))


# ----------------------------------------------------------------------- transformers


def test_our_shards_load_in_transformers_and_theirs_in_ours(folders, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _, sharded = folders
    ours = _logits(model, TOKENS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sharded)).float().eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(TOKENS).long()).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / INDEX).is_file()
    assert len(list((tmp_path / "theirs").glob("model-*-of-*.safetensors"))) >= 2
    _, loaded = lm.load_lm(tmp_path / "theirs")
    np.testing.assert_allclose(_logits(loaded, TOKENS), ref, atol=1e-5, rtol=0)

"""Every checkpoint loader names the folder, the file and the key when a checkpoint is broken.

For each loader a valid tiny checkpoint is written, then broken in one way: the folder is
missing, a required file is missing, a config value has the wrong type, or a required config key
is missing. The error must be a ``FileNotFoundError`` or ``ValueError`` (what the CLI reports)
whose message names the folder, the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.app.tasks.arith_models import load_arith_policy, load_arith_prm
from tts_jax.app.tasks.arith_tokenizer import ARITH_LM_DIR
from tts_jax.models import zoo
from tts_jax.models.classifier import (
    ClassifierConfig,
    build_module,
    load_classifier,
    save_classifier,
)
from tts_jax.models.dit import DiTConfig, init_dit, load_dit, save_dit
from tts_jax.models.lm import LM, LMConfig, load_lm, save_lm
from tts_jax.models.lm_reward import RewardModel, load_reward_model, save_reward_model
from tts_jax.models.vae import AutoencoderKL, VAEConfig, load_vae, save_vae
from tts_jax.models.wrappers import DDPMInterpolant, load_ddpm_dit_pipeline
from tts_jax.rewards.classifier import load_digits_heldout, load_digits_verifier

DIT = DiTConfig(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=1,
    out_channels=2,
    num_layers=1,
    sample_size=4,
    patch_size=2,
    num_embeds_ada_norm=10,
)
VAE = VAEConfig(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=8)
LM_CONFIG = LMConfig(
    model_type="qwen2",
    vocab_size=16,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
CLASSIFIER = ClassifierConfig(architecture="mlp", hidden=(4,), features=3)
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}


def _write_dit(folder: Path) -> None:
    save_dit(folder, DIT, init_dit(DIT))


def _write_vae(folder: Path) -> None:
    save_vae(folder, VAE, AutoencoderKL(VAE, rngs=nnx.Rngs(0)))


def _write_lm(folder: Path) -> None:
    save_lm(folder, LM_CONFIG, LM(LM_CONFIG, rngs=nnx.Rngs(0)))


def _write_prm(folder: Path) -> None:
    save_reward_model(folder, LM_CONFIG, RewardModel(LM_CONFIG, 2, rngs=nnx.Rngs(0)))


def _write_classifier(folder: Path) -> None:
    save_classifier(folder, CLASSIFIER, build_module(CLASSIFIER))


def _write_arith_policy(folder: Path) -> None:
    _write_lm(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ARITH_LM_DIR / name, folder / name)


def _write_pipeline(folder: Path) -> None:
    _write_dit(folder / "transformer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))


@dataclasses.dataclass(frozen=True)
class Case:
    """One loader and how to break its checkpoint (paths relative to the checkpoint folder).

    Attributes:
        write: writes a valid checkpoint into a (new) folder.
        required_file: a file the loader needs.
        bad: ``(config file, key, wrongly typed value)``.
        missing: ``(config file, key)``: a key the loader cannot do without.
        load: loads a folder; ``None`` for an embedded asset loaded by name (``asset_load``).
        asset: for embedded-asset loaders, the asset's folder name under ``zoo.ASSETS_DIR``.
        asset_load: the no-argument loader of an embedded asset.
    """

    write: Callable[[Path], None]
    required_file: str
    bad: tuple[str, str, Any]
    missing: tuple[str, str]
    load: Callable[[Path], Any] | None = None
    asset: str | None = None
    asset_load: Callable[[], Any] | None = None


C = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS = "model.safetensors"
CASES = {
    "load_dit": Case(
        _write_dit,
        DIFFUSERS_WEIGHTS,
        (C, "sample_size", "eight"),
        (C, "patch_size"),
        load=load_dit,
    ),
    "load_vae": Case(
        _write_vae,
        DIFFUSERS_WEIGHTS,
        (C, "latent_channels", "four"),
        (C, "block_out_channels"),
        load=load_vae,
    ),
    "load_lm": Case(_write_lm, WEIGHTS, (C, "hidden_size", "8"), (C, "vocab_size"), load=load_lm),
    "load_reward_model": Case(
        _write_prm,
        WEIGHTS,
        (C, "num_hidden_layers", 1.5),
        (C, "num_attention_heads"),
        load=load_reward_model,
    ),
    "load_classifier": Case(
        _write_classifier,
        WEIGHTS,
        (C, "features", "wide"),
        (C, "hidden"),
        load=load_classifier,
    ),
    "load_arith_policy": Case(
        _write_arith_policy,
        "tokenizer.json",
        (C, "vocab_size", [16]),
        (C, "hidden_size"),
        load=load_arith_policy,
    ),
    "load_arith_prm": Case(
        _write_prm,
        WEIGHTS,
        (C, "tie_word_embeddings", "no"),
        (C, "intermediate_size"),
        load=load_arith_prm,
    ),
    "load_ddpm_dit_pipeline": Case(
        _write_pipeline,
        f"transformer/{DIFFUSERS_WEIGHTS}",
        ("scheduler/scheduler_config.json", "num_train_timesteps", "1000"),
        (f"transformer/{C}", "patch_size"),
        load=load_ddpm_dit_pipeline,
    ),
    "load_ddpm_dit_pipeline-transformer": Case(
        _write_pipeline,
        "scheduler/scheduler_config.json",
        (f"transformer/{C}", "num_layers", None),
        (f"transformer/{C}", "patch_size"),
        load=load_ddpm_dit_pipeline,
    ),
    "zoo.load_embedded": Case(
        _write_dit,
        DIFFUSERS_WEIGHTS,
        (C, "num_attention_heads", "two"),
        (C, "patch_size"),
        asset="digits-dit",
        asset_load=lambda: zoo.load_embedded("digits-dit"),
    ),
    "zoo.load_digits_flow": Case(
        _write_dit,
        C,
        (C, "in_channels", True),
        (C, "patch_size"),
        asset="digits-dit",
        asset_load=zoo.load_digits_flow,
    ),
    "load_digits_verifier": Case(
        _write_classifier,
        WEIGHTS,
        (C, "num_classes", 10.0),
        (C, "architecture"),
        asset="digits-verifier",
        asset_load=load_digits_verifier,
    ),
    "load_digits_heldout": Case(
        _write_classifier,
        C,
        (C, "image_shape", [1, 8]),
        (C, "features"),
        asset="digits-heldout",
        asset_load=load_digits_heldout,
    ),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One valid checkpoint per writer, copied by each test before it is broken."""
    cache = {}

    def get(write: Callable[[Path], None]) -> Path:
        if write not in cache:
            folder = tmp_path_factory.mktemp("valid") / "ckpt"
            write(folder)
            cache[write] = folder
        return cache[write]

    return get


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param, CASES[request.param]


@pytest.fixture
def checkpoint(case, written, tmp_path, monkeypatch):
    """``(case, folder, load)``: a fresh copy of a valid checkpoint and a no-argument loader."""
    _, c = case
    if c.asset is not None:
        monkeypatch.setattr(zoo, "ASSETS_DIR", tmp_path / "assets")
        folder = tmp_path / "assets" / c.asset
        load = c.asset_load
    else:
        folder = tmp_path / "ckpt"
        load = lambda: c.load(folder)  # noqa: E731
    shutil.copytree(written(c.write), folder)
    return c, folder, load


def _error(load: Callable[[], Any]) -> str:
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        load()
    return str(info.value)


def _edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=2))


def test_valid_checkpoint_loads(checkpoint):
    _, _, load = checkpoint
    load()


def test_missing_folder_is_named(checkpoint):
    _, folder, load = checkpoint
    shutil.rmtree(folder)
    message = _error(load)
    assert str(folder) in message and "does not exist" in message


def test_missing_file_names_folder_and_file(checkpoint):
    c, folder, load = checkpoint
    file = folder / c.required_file
    file.unlink()
    message = _error(load)
    assert str(file.parent) in message and file.name in message
    assert "Errno" not in message


def test_wrongly_typed_key_names_folder_file_key_and_value(checkpoint):
    c, folder, load = checkpoint
    config, key, value = c.bad
    file = folder / config
    _edit_config(file, lambda raw: raw.__setitem__(key, value))
    message = _error(load)
    assert f"{file.name} in {file.parent}" in message
    assert f'"{key}" must be ' in message
    assert f"got {value!r} ({type(value).__name__})" in message


def test_missing_key_names_folder_file_and_key(checkpoint):
    c, folder, load = checkpoint
    config, key = c.missing
    file = folder / config
    _edit_config(file, lambda raw: raw.pop(key))
    message = _error(load)
    assert f"{file.name} in {file.parent}" in message
    assert f'required key "{key}"' in message


# ----------------------------------------------------------------------- single-loader details


@pytest.fixture
def dit_folder(written, tmp_path):
    folder = tmp_path / "dit"
    shutil.copytree(written(_write_dit), folder)
    return folder


def test_message_format_of_a_wrongly_typed_key(dit_folder):
    _edit_config(dit_folder / "config.json", lambda raw: raw.__setitem__("sample_size", "eight"))
    with pytest.raises(ValueError) as info:
        load_dit(dit_folder)
    assert str(info.value) == (
        f"load_dit: config.json in {dit_folder}: \"sample_size\" must be an int, got 'eight' (str)"
    )


def test_several_wrong_keys_are_all_named(dit_folder):
    def edit(raw):
        raw |= {"sample_size": "eight", "attention_bias": "yes", "out_channels": 2.5}

    _edit_config(dit_folder / "config.json", edit)
    message = _error(lambda: load_dit(dit_folder))
    assert '"sample_size" must be an int' in message
    assert '"attention_bias" must be a boolean' in message
    assert '"out_channels" must be an int or null, got 2.5 (float)' in message


def test_invalid_json_names_file_and_line(dit_folder):
    (dit_folder / "config.json").write_text('{\n  "patch_size": 2,\n  "sample_size": 8,,\n}')
    message = _error(lambda: load_dit(dit_folder))
    assert f"config.json in {dit_folder} is invalid JSON" in message and "line 3" in message


def test_config_that_is_not_an_object(dit_folder):
    (dit_folder / "config.json").write_text("[1, 2]")
    message = _error(lambda: load_dit(dit_folder))
    assert f"config.json in {dit_folder} must hold a JSON object" in message


def test_a_file_instead_of_a_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    for load in (load_dit, load_vae, load_lm, load_reward_model, load_classifier):
        message = _error(lambda load=load: load(file))
        assert f"{load.__name__}: {file} is not a directory" in message


def test_missing_file_lists_what_the_folder_holds(dit_folder):
    (dit_folder / "diffusion_pytorch_model.safetensors").rename(dit_folder / "model.bin")
    message = _error(lambda: load_dit(dit_folder))
    assert "has no diffusion_pytorch_model.safetensors" in message
    assert "config.json, model.bin" in message


def test_unsupported_config_values_name_the_file(dit_folder, written, tmp_path):
    _edit_config(dit_folder / "config.json", lambda raw: raw.__setitem__("norm_type", "layer"))
    message = _error(lambda: load_dit(dit_folder))
    assert f"load_dit: config.json in {dit_folder}: " in message and "norm_type" in message
    lm_folder = tmp_path / "lm"
    shutil.copytree(written(_write_lm), lm_folder)
    _edit_config(lm_folder / "config.json", lambda raw: raw.__setitem__("model_type", "gpt2"))
    message = _error(lambda: load_lm(lm_folder))
    assert f"load_lm: config.json in {lm_folder}: " in message and "model_type" in message


def test_unreadable_safetensors_names_the_file(written, tmp_path):
    for write, load, weights in (
        (_write_dit, load_dit, "diffusion_pytorch_model.safetensors"),
        (_write_lm, load_lm, "model.safetensors"),
        (_write_classifier, load_classifier, "model.safetensors"),
    ):
        folder = tmp_path / load.__name__
        shutil.copytree(written(write), folder)
        (folder / weights).write_bytes(b"not a safetensors file")
        message = _error(lambda load=load, folder=folder: load(folder))
        assert f"{weights} in {folder} is not a readable safetensors file" in message


@pytest.mark.parametrize("write, load", [(_write_dit, load_dit), (_write_vae, load_vae)])
def test_tensor_mismatch_names_the_tensor_and_the_file(written, tmp_path, write, load):
    folder = tmp_path / "ckpt"
    shutil.copytree(written(write), folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    name = sorted(tensors)[0]
    tensors[name] = np.zeros((3, 3, 3), np.float32)
    save_file(tensors, file)
    message = _error(lambda: load(folder))
    assert repr(name) in message and f"diffusion_pytorch_model.safetensors in {folder}" in message


def test_scheduler_config_dict_is_checked():
    with pytest.raises(ValueError, match="\"beta_end\" must be a number, got '0.02'"):
        DDPMInterpolant.from_scheduler_config({"beta_end": "0.02"})
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMInterpolant.from_scheduler_config({"prediction_type": "v_prediction"})


def test_missing_pipeline_subfolder_is_named(written, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(written(_write_pipeline), folder)
    shutil.rmtree(folder / "scheduler")
    message = _error(lambda: load_ddpm_dit_pipeline(folder))
    assert f"folder {folder} has no scheduler/" in message

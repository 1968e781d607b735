"""Pipeline folders: the tiny builders of tests/t2i_folders.py (diffusers loads and runs them) and
pipelines.folder's reading, named errors and hub resolution (the hub is never contacted)."""

import json
import shutil

import numpy as np
import pytest

from tts_jax.models import checkpoint
from tts_jax.models.pipelines import folder as F
from tts_jax.models.pipelines import schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests import t2i_folders as T  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd3": T.make_tiny_sd3(root / "sd3"),
        "sd35": T.make_tiny_sd3(root / "sd35", "sd35"),
        "flux": T.make_tiny_flux(root / "flux"),
        "schnell": T.make_tiny_flux(root / "schnell", guidance_embeds=False),
    }


def _copy(tiny, name, tmp_path):
    return shutil.copytree(tiny[name], tmp_path / name)


def _edit_index(folder, **changes):
    file = folder / F.MODEL_INDEX_NAME
    index = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            index.pop(key)
        else:
            index[key] = value
    file.write_text(json.dumps(index))


# --------------------------------------------------------------------------- the builders


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux", "schnell"])
def test_diffusers_loads_and_runs_tiny_pipeline(tiny, name):
    pipe = T.load_reference(tiny[name])
    assert type(pipe).__name__ == (
        "FluxPipeline" if "flux" in name or name == "schnell" else "StableDiffusion3Pipeline"
    )
    assert pipe.vae_scale_factor == T.VAE_SCALE_FACTOR
    assert pipe.vae.config.latent_channels == 16 and not pipe.vae.config.use_quant_conv
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=T.IMAGE_SIZE,
        width=T.IMAGE_SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=T.MAX_SEQUENCE_LENGTH,
    ).images
    assert out.shape == (1, T.IMAGE_SIZE, T.IMAGE_SIZE, 3) and np.isfinite(out).all()
    assert out.std() > 0.05  # not a constant image


def test_reference_helpers(tiny):
    pipe = T.load_reference(tiny["sd3"])
    latents = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
    a = T.reference_images(pipe, "a red car", latents)
    b = T.reference_images(pipe, ["a red car", "a red car"], latents)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 32, 32, 3) and not np.allclose(a[0], a[1])
    embeds = T.reference_prompt_embeds(pipe, ["a cat", "a dog"])
    assert embeds["prompt_embeds"].shape == (2, T.CLIP_MAX_LENGTH + T.MAX_SEQUENCE_LENGTH, 48)
    assert embeds["pooled_prompt_embeds"].shape == (2, 40)
    flux = T.load_reference(tiny["flux"])
    final = T.reference_images(flux, "a cat", latents, output_type="latent")
    assert final.shape == (2, 16, 4 * 16)  # packed
    embeds = T.reference_prompt_embeds(flux, "a cat")
    assert embeds["prompt_embeds"].shape == (1, T.MAX_SEQUENCE_LENGTH, 48)
    assert embeds["pooled_prompt_embeds"].shape == (1, 16)


def test_tiny_tokenizers_have_the_real_layout(tiny):
    import transformers

    sd3 = tiny["sd3"]
    assert sorted(p.name for p in (sd3 / "tokenizer").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    clip = transformers.CLIPTokenizer.from_pretrained(sd3 / "tokenizer")
    ids = clip("a photo of a cat", padding="max_length", max_length=T.CLIP_MAX_LENGTH).input_ids
    vocab, _ = T.clip_vocab_and_merges()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[:6] == [
        bos,
        vocab["a</w>"],
        vocab["photo</w>"],
        vocab["of</w>"],
        vocab["a</w>"],
        vocab["cat</w>"],
    ]
    assert ids[6:] == [eos] * (T.CLIP_MAX_LENGTH - 6)
    clip_g = transformers.CLIPTokenizer.from_pretrained(sd3 / "tokenizer_2")
    assert clip_g("a", padding="max_length", max_length=5).input_ids == [
        bos,
        vocab["a</w>"],
        eos,
        0,
        0,
    ]
    t5 = transformers.AutoTokenizer.from_pretrained(sd3 / "tokenizer_3")
    t5_ids = {piece: i for i, (piece, _) in enumerate(T.t5_vocab())}
    expected = [t5_ids["▁a"], t5_ids["▁cat"], 1, 0, 0]  # </s> 1, <pad> 0
    assert t5("a cat", padding="max_length", max_length=5).input_ids == expected


def test_tiny_scheduler_configs_are_read(tiny):
    sd3 = schedule.read_scheduler_config(tiny["sd3"] / "scheduler")
    assert sd3.shift == 3.0 and not sd3.use_dynamic_shifting
    flux = schedule.read_scheduler_config(tiny["flux"] / "scheduler")
    assert flux.use_dynamic_shifting and flux.base_image_seq_len == 256


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_vae_of_the_pipeline_matches_its_decode(tiny, name):
    """load_vae on the pipeline's vae/ reproduces the pipeline's last step: unpack (FLUX),
    ``latents / scaling_factor + shift_factor``, decode, ``[-1, 1] -> [0, 1]``."""
    import jax.numpy as jnp

    from tts_jax.models.vae import load_vae

    pipe = T.load_reference(tiny[name])
    latents = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
    final = T.reference_images(pipe, "a cat", latents, output_type="latent")
    images = T.reference_images(pipe, "a cat", latents)
    if name == "flux":
        final = T.unpack_flux_latents(final, 8, 8)
    unpacked = T.unpack_flux_latents(T.pack_flux_latents(latents), 8, 8)
    np.testing.assert_array_equal(unpacked, latents)
    config, vae = load_vae(F.read_pipeline_folder(tiny[name]).vae)
    factors = T.SD3_VAE if name == "sd3" else T.FLUX_VAE
    assert config.shift_factor == factors["shift_factor"]
    assert config.scaling_factor == factors["scaling_factor"]
    ours = np.asarray(vae.decode_latents(jnp.asarray(final)))
    ours = np.clip(ours / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, images, atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- reading


def test_read_sd3_folder(tiny):
    desc = F.read_pipeline_folder(tiny["sd35"])
    assert desc.kind == "sd3" and desc.class_name == "StableDiffusion3Pipeline"
    root = tiny["sd35"]
    assert desc.transformer == root / "transformer" and desc.vae == root / "vae"
    assert desc.text_encoders == tuple(
        root / f for f in ("text_encoder", "text_encoder_2", "text_encoder_3")
    )
    assert desc.tokenizer_3 == root / "tokenizer_3" and desc.scheduler == root / "scheduler"
    assert desc.classes["text_encoder"] == ("transformers", "CLIPTextModelWithProjection")
    assert desc.classes["transformer"] == ("diffusers", "SD3Transformer2DModel")
    assert desc.diffusers_version == diffusers.__version__


def test_read_flux_folder(tiny):
    desc = F.read_pipeline_folder(str(tiny["schnell"]))
    assert desc.kind == "flux" and desc.text_encoder_3 is None and desc.tokenizer_3 is None
    assert desc.classes["text_encoder"] == ("transformers", "CLIPTextModel")
    assert desc.classes["text_encoder_2"] == ("transformers", "T5EncoderModel")
    weights = F.find_component_weights(desc.transformer)
    assert [f.name for f in weights.files] == ["diffusion_pytorch_model.safetensors"]
    weights = F.find_component_weights(desc.text_encoder_2, "transformers")
    assert [f.name for f in weights.files] == ["model.safetensors"]


def test_sd3_without_t5(tiny, tmp_path):
    folder = _copy(tiny, "sd3", tmp_path)
    _edit_index(folder, text_encoder_3=[None, None], tokenizer_3=[None, None])
    shutil.rmtree(folder / "text_encoder_3")
    desc = F.read_pipeline_folder(folder)
    assert desc.text_encoder_3 is None and len(desc.text_encoders) == 2


def test_sharded_component(tiny, tmp_path):
    folder = _copy(tiny, "flux", tmp_path)
    sub = folder / "text_encoder_2"
    tensors = checkpoint.read_tensors(sub, "test", "model.safetensors")
    checkpoint.save_tensors(sub, tensors, "model.safetensors", max_shard_size=20_000)
    F.read_pipeline_folder(folder)
    weights = F.find_component_weights(sub, "transformers")
    assert weights.index.name == "model.safetensors.index.json" and len(weights.files) > 1


def test_missing_folder(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="does not exist"):
        F.read_pipeline_folder(tmp_path / "nope")


def test_folder_without_model_index(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(F.NotAPipelineFolderError, match="not a diffusers pipeline") as info:
        F.read_pipeline_folder(tmp_path)
    assert "model_index.json" in str(info.value) and "notes.txt" in str(info.value)
    with pytest.raises(F.NotAPipelineFolderError, match="single model folder"):
        F.read_pipeline_folder(tiny["sd3"] / "transformer")
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"")
    with pytest.raises(F.NotAPipelineFolderError, match="single-file checkpoints"):
        F.read_pipeline_folder(tmp_path)
    assert issubclass(F.NotAPipelineFolderError, FileNotFoundError)


def test_unsupported_pipeline_class(tiny, tmp_path):
    folder = _copy(tiny, "sd3", tmp_path)
    _edit_index(folder, _class_name="StableDiffusionXLPipeline")
    with pytest.raises(F.UnsupportedPipelineError, match="StableDiffusionXLPipeline") as info:
        F.read_pipeline_folder(folder)
    assert "StableDiffusion3Pipeline, FluxPipeline" in str(info.value)
    assert isinstance(info.value, checkpoint.CheckpointConfigError)


def test_missing_component(tiny, tmp_path):
    folder = _copy(tiny, "flux", tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(F.MissingComponentError, match=r"no vae/ sub-folder.*AutoencoderKL"):
        F.read_pipeline_folder(folder)
    _edit_index(folder, vae=None)
    with pytest.raises(F.MissingComponentError, match="lists no 'vae' component"):
        F.read_pipeline_folder(folder)
    _edit_index(folder, vae=["diffusers"])
    with pytest.raises(checkpoint.CheckpointConfigError, match='"vae" must be'):
        F.read_pipeline_folder(folder)


def test_pickle_only_component(tiny, tmp_path):
    folder = _copy(tiny, "sd3", tmp_path)
    sub = folder / "transformer"
    (sub / "diffusion_pytorch_model.safetensors").unlink()
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(F.PickleWeightsError, match="only pickle weights") as info:
        F.read_pipeline_folder(folder)
    assert "safe_serialization=True" in str(info.value) and str(sub) in str(info.value)
    (sub / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="has no"):
        F.read_pipeline_folder(folder)


def test_component_without_config(tiny, tmp_path):
    folder = _copy(tiny, "flux", tmp_path)
    (folder / "text_encoder" / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="has no config.json"):
        F.read_pipeline_folder(folder)


# --------------------------------------------------------------------------- hub resolution


def test_resolve_local_paths(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be called for a local folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    assert F.resolve_pipeline(tiny["sd3"]) == tiny["sd3"]
    assert F.resolve_pipeline(str(tiny["flux"])) == tiny["flux"]
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="not a hub id"):
        F.resolve_pipeline(tmp_path / "a" / "b" / "c")
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="not a hub id"):
        F.resolve_pipeline("./nope")


def test_resolve_hub_id_offline(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(F.HubUnreachableError, match="hub is unreachable") as info:
        F.resolve_pipeline("black-forest-labs/FLUX.1-schnell")
    message = str(info.value)
    assert "huggingface-cli download black-forest-labs/FLUX.1-schnell --local-dir DIR" in message
    assert "LocalEntryNotFoundError" in message
    assert isinstance(info.value, FileNotFoundError)


def test_resolve_hub_id_downloads_only_what_is_read(tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny["flux"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert F.resolve_pipeline("black-forest-labs/FLUX.1-dev", revision="main") == tiny["flux"]
    ((repo_id, kwargs),) = calls
    assert repo_id == "black-forest-labs/FLUX.1-dev" and kwargs["revision"] == "main"
    repo_files = [
        "model_index.json",
        "flux1-dev.safetensors",
        "ae.safetensors",
        "README.md",
        "dev_grid.jpg",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "scheduler/scheduler_config.json",
    ]
    kept = set(filter_repo_objects(repo_files, allow_patterns=kwargs["allow_patterns"]))
    assert kept == {
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "scheduler/scheduler_config.json",
    }

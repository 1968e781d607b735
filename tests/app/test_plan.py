"""The memory plan (tts_jax.app.plan): shipped configs parse and give the published sizes
(abstract modules, nothing materialised); on a tiny SD3 folder the compiled numbers are
consistent (weights = sum of parameter sizes, among the arguments; temporaries grow with the
particles). Compiles are unoptimised (the numbers checked do not depend on it) and tiny."""

import json

import jax
import pytest

from tts_jax.app import plan as P
from tts_jax.models.clip import CLIPTextConfig
from tts_jax.models.flux import FluxConfig
from tts_jax.models.pipelines.schedule import FlowMatchConfig
from tts_jax.models.sd3 import SD3Config
from tts_jax.models.t5 import T5Config
from tts_jax.models.vae import VAEConfig

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tests import t2i_folders as T  # noqa: E402

_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return T.make_tiny_sd3(tmp_path_factory.mktemp("plan") / "sd3")
    finally:
        torch.set_num_threads(threads)


def _param_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_shipped_configs_parse():
    """Every shipped config file is accepted by our config classes, with the public values
    that set the sizes (parameter counts are checked in the plan report: building a 12B
    abstract module takes ~20 s)."""
    for name in P.PIPELINES:
        folder = P.CONFIGS / name
        raw = json.loads((folder / "transformer/config.json").read_text())
        config = (FluxConfig if name.startswith("flux") else SD3Config).from_dict(raw)
        vae = VAEConfig.from_dict(json.loads((folder / "vae/config.json").read_text()))
        FlowMatchConfig.from_dict(
            json.loads((folder / "scheduler/scheduler_config.json").read_text())
        )
        assert vae.latent_channels == 16 and len(vae.block_out_channels) == 4
        t5 = json.loads(
            (folder / sorted(folder.glob("text_encoder*"))[-1].name / "config.json").read_text()
        )
        assert T5Config.from_hf_dict(t5).d_model == config.joint_attention_dim == 4096
        clip = json.loads((folder / "text_encoder/config.json").read_text())
        assert CLIPTextConfig.from_hf_dict(clip).hidden_size == 768
    assert not FluxConfig.from_dict(
        json.loads((P.CONFIGS / "flux-schnell/transformer/config.json").read_text())
    ).guidance_embeds


def test_unknown_config_is_named():
    with pytest.raises(ValueError, match="unknown pipeline config 'flux-pro'"):
        P.abstract_pipeline("flux-pro")


def test_tiny_plan_is_consistent(tiny_sd3):
    plan = P.memory_plan(
        tiny_sd3,
        T.IMAGE_SIZE,
        T.IMAGE_SIZE,
        (1, 4),
        "float32",
        3,
        max_sequence_length=T.MAX_SEQUENCE_LENGTH,
        compiler_options=_FAST,
    )
    pipe = plan.pipeline
    weights = _param_bytes(pipe.pipeline.transformer_params[1])
    vae = pipe.pipeline.vae_params[1]
    weights += sum(_param_bytes(vae[k]) for k in ("decoder", "post_quant_conv") if k in vae)
    one, four = plan.rows
    assert one.weight_bytes == four.weight_bytes == weights
    for row in plan.rows:
        assert row.argument_bytes >= row.weight_bytes  # weights are arguments of the step
        assert row.peak_bytes >= row.argument_bytes + row.temp_bytes - row.alias_bytes
        assert plan.fits(row, P.DEVICES["16 GiB TPU"])
        assert plan.accelerator_bytes(row) <= row.peak_bytes
    assert four.temp_bytes > one.temp_bytes
    assert four.argument_bytes > one.argument_bytes  # the particle state is an argument
    # CFG (SD3's default guidance 7): 2N rows of 2 heads over 16 image + 77 + 24 text tokens.
    assert four.attention_logits_bytes == 2 * 4 * 2 * (16 + 77 + 24) ** 2 * 4
    table = plan.markdown()
    assert table.count("\n| ") == 3 and "fits 80 GiB GPU" in table
    assert plan.temp_per_particle == (four.temp_bytes - one.temp_bytes) / 3


def test_command_line_parses():
    import tyro

    cmd = tyro.cli(
        P.Plan, args=["--config", "flux-dev", "--particles", "1", "2", "--height", "512"]
    )
    assert (cmd.config, cmd.particles, cmd.height, cmd.mode) == ("flux-dev", (1, 2), 512, None)
    resolved = P._resolved(cmd, P.plan_kind(cmd.config))
    assert (resolved["height"], resolved["width"], resolved["mode"]) == (512, 1024, "step")
    assert resolved["particles"] == (1, 2) and "max_new_tokens" not in resolved
    with pytest.raises(ValueError, match="unknown plan config 'flux-pro'"):
        P.run_plan(tyro.cli(P.Plan, args=["--config", "flux-pro"]))

"""Every image sampler steers a text-to-image pipeline (tiny SD3 and FLUX folders of
tests/t2i_folders.py) with an in-graph reward on decoded images that reads the prompt.

The kernels run through one ``jax.jit(run)`` with unoptimised XLA (a 3-4x faster compile; the
programs are tiny), after each module's host-side ``check_params``. Kim et al.'s best-of-N
baseline is noise_search's ``best_of_n``. Budgets are minimal: 3 steps, 2-4 particles.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models.pipelines.text_to_image import decoded_reward, load_text_to_image
from tts_jax.samplers import run
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.image import flow_particles as fp
from tts_jax.samplers.image import flow_search as fs
from tts_jax.samplers.image import noise_search as ns

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tests import t2i_folders as T  # noqa: E402

SIZE, STEPS = T.IMAGE_SIZE, 3
SHAPE = (T.LATENT_CHANNELS, T.LATENT_SIZE, T.LATENT_SIZE)
SDE = I.diffusion("square", 1.0)
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
_run = jax.jit(run, static_argnames="sampler", compiler_options=_FAST)


def prompt_colour(params, images, cond):
    """Toy prompt-image agreement: minus the squared distance of each image's mean colour to
    ``tanh(pooled @ W)``, a colour the prompt's pooled embedding picks (``images [N, 3, H, W]``
    in [-1, 1], ``cond.pooled [B, P]`` with B = 1 or N) -> ``[N]``."""
    colours = images.mean(axis=(2, 3))
    target = jnp.tanh(cond.pooled.astype(jnp.float32) @ params)
    return -jnp.mean(jnp.square(colours - target), axis=-1)


class Setup(NamedTuple):
    flow: object
    reward: object
    grid: object
    cond: object


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_samplers")
    folders = {"sd3": T.make_tiny_sd3(root / "sd3"), "flux": T.make_tiny_flux(root / "flux")}
    out = {}
    for kind, folder in folders.items():
        pipe = load_text_to_image(folder, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
        cond = pipe.encode_prompt("a photo of a red car")
        direction = np.random.default_rng(0).standard_normal((cond.pooled.shape[-1], 3))
        reward = decoded_reward(pipe, prompt_colour, jnp.asarray(direction, jnp.float32), "colour")
        flow = pipe.flow(SIZE, SIZE, guidance_scale=3.5)
        out[kind] = Setup(flow, reward, pipe.grid(STEPS, SIZE, SIZE), cond)
    return out


def _check(result, num: int):
    samples, rewards = np.asarray(result.samples), np.asarray(result.rewards)
    assert samples.shape == (num, *SHAPE) and np.isfinite(samples).all()
    assert rewards.shape == (num,) and np.isfinite(rewards).all()
    assert int(result.info.num_nan) == 0 and int(result.info.num_inf) == 0
    assert int(result.cost.nfe) > 0 and int(result.cost.reward_calls) > 0


# --------------------------------------------------------------------------- FK steering / SMC


@functools.cache
def _fk_sampler():
    """FK steering with the ``diff`` potential and multinomial resampling: the kernel of
    flow_particles.smc too, so FK, SMC and the lam = 0 check share one compiled program."""
    return fk.sampler(4, STEPS, "diff", "multinomial")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fk_steering_and_smc(setups, kind):
    s = setups[kind]
    sampler = _fk_sampler()
    params = fk.make_params(s.flow, s.reward, s.grid, SDE, 5.0, cond=s.cond)
    fk.check_params(params, sampler)
    _check(_run(jax.random.key(0), sampler, params), 4)
    params = fp.smc_params(s.flow, s.reward, s.grid, SDE, 5.0, cond=s.cond)
    assert fp.smc_sampler(4, STEPS) is sampler
    fk.check_params(params, sampler, "smc")
    result = _run(jax.random.key(1), sampler, params)
    _check(result, 4)
    assert np.asarray(result.info.resampled).all()  # smc resamples after every step


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fk_with_lam_zero_is_independent_sampling(setups, kind):
    """lam = 0: uniform weights, never resampled (adaptive schedule, ESS = N), the same
    particles as the same key's run that never resamples whatever the weights."""
    s = setups[kind]
    sampler = _fk_sampler()
    key = jax.random.key(3)
    flat = _run(key, sampler, fk.make_params(s.flow, s.reward, s.grid, SDE, 0.0, cond=s.cond))
    never = smc.never(STEPS)
    free = _run(key, sampler, fk.make_params(s.flow, s.reward, s.grid, SDE, 4.0, never, s.cond))
    np.testing.assert_array_equal(np.asarray(flat.samples), np.asarray(free.samples))
    np.testing.assert_allclose(np.asarray(flat.log_weights), np.log(np.full(4, 0.25)), atol=1e-6)
    assert not np.asarray(flat.info.resampled).any()
    assert float(flat.log_evidence) == pytest.approx(0.0, abs=1e-6)
    assert len(np.unique(np.asarray(flat.samples).reshape(4, -1), axis=0)) == 4


# --------------------------------------------------------------------------- noise search


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["best_of_n", "zero_order_search", "search_over_paths"])
def test_noise_search(setups, kind, method):
    s = setups[kind]
    sampler, num = {
        "best_of_n": lambda: (ns.best_of_n_sampler(2), 2),
        "zero_order_search": lambda: (ns.zero_order_sampler(1, num_neighbours=2), 1),
        "search_over_paths": lambda: (ns.paths_sampler(2, STEPS, num_branches=2), 2),
    }[method]()
    params = ns.make_params(s.flow, s.reward, s.grid, cond=s.cond)
    ns.check_params(params, sampler)
    result = _run(jax.random.key(0), sampler, params)
    _check(result, num)
    assert int(result.best) == int(np.argmax(np.asarray(result.rewards)))


# --------------------------------------------------------------------------- flow particles


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["svdd", "code", "rbf"])
def test_flow_particle_search(setups, kind, method):
    s = setups[kind]
    sampler = {
        "svdd": lambda: fp.svdd_sampler(2, 2, STEPS),
        "code": lambda: fp.code_sampler(2, 2, STEPS, block=2),
        "rbf": lambda: fp.rbf_sampler(2, 1, STEPS, budget=8),
    }[method]()
    params = fs.make_params(s.flow, s.reward, s.grid, SDE, cond=s.cond)
    fs.check_params(params, sampler)
    _check(_run(jax.random.key(0), sampler, params), 2)

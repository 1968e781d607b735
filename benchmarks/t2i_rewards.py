"""CLIP-family reward throughput, tts-jax vs PyTorch, and the reward's share of an FK step.

1. **PickScore evaluations per second** (:func:`tts_jax.rewards.clip.pickscore`, in-graph JAX:
   CLIP preprocessing as JAX ops, the image tower, the cosine with the prompt's embedding
   computed once) vs the PyTorch reference: transformers' ``CLIPModel.get_image_features`` after
   the same preprocessing in PyTorch (antialiased bicubic resize, clamp, centre crop,
   normalisation; tests/rewards/test_reward_clip.py's reference), times ``exp(logit_scale)``
   times the cosine with the prompt's unit text embedding (computed once too), under
   ``torch.inference_mode``. The tiny random CLIP of tests/rewards/test_reward_clip.py (2 + 2
   layers of width 32, 32 x 32 images in 8 x 8 patches); the images are ``N`` decoded images of
   the tiny SD3 pipeline's size, 32 x 32 in ``[-1, 1]``. PyTorch is timed with
   ``torch.set_num_threads`` at XLA's CPU thread count and, alternately, at 1 thread.
2. **Share of an FK step spent in the reward** on the tiny SD3 pipeline (tests/t2i_folders.py):
   FK steering with adaptive resampling (a reward call after every step) with three rewards,
   timed alternately: a free reward on the latents, the VAE decode plus a free image reward,
   and the VAE decode plus PickScore. The differences give the decode's and PickScore's shares
   of the step.

Medians of alternating rounds in one process (:func:`benchmarks.timing.interleaved`). Run:
``python -m benchmarks.t2i_rewards``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import interleaved, median_ratio
from tests import t2i_folders as T
from tests.rewards import test_reward_clip as C
from tts_jax import interpolants as I
from tts_jax.models.pipelines.text_to_image import decoded_reward, load_text_to_image
from tts_jax.rewards import clip as rclip
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import run
from tts_jax.samplers.image import fk_steering as fk

REWARD_N = (16, 64)
FK_N = 8
STEPS = 10
THREADS = os.cpu_count() or 1
F = torch.nn.functional

_run = jax.jit(run, static_argnames="sampler")


@jax.jit
def jax_reward(reward: Reward, x: jax.Array) -> jax.Array:
    return reward(x)


class TorchPickScore:
    """The PyTorch reference: the same preprocessing, ``CLIPModel`` image features, the scaled
    cosine with the prompt's unit text embedding (computed once)."""

    def __init__(self, ref, prompt: np.ndarray):
        self.ref = ref
        with torch.inference_mode():
            text = ref.get_text_features(input_ids=torch.from_numpy(prompt[None]).long())
            text = text.pooler_output if hasattr(text, "pooler_output") else text
            self.text = text / text.norm(dim=-1, keepdim=True)
            self.scale = ref.logit_scale.exp()
        self.mean = torch.tensor(C.transformers.image_utils.OPENAI_CLIP_MEAN)[None, :, None, None]
        self.std = torch.tensor(C.transformers.image_utils.OPENAI_CLIP_STD)[None, :, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x01 = ((x.clamp(-1, 1) + 1) / 2).float()
            h, w = x01.shape[2:]
            size = C.SIZE
            shape = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            if shape != (h, w):
                x01 = F.interpolate(x01, size=shape, mode="bicubic", antialias=True)
            x01 = x01.clamp(0, 1)
            top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
            x01 = x01[:, :, top : top + size, left : left + size]
            emb = self.ref.get_image_features(pixel_values=(x01 - self.mean) / self.std)
            emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.scale * (emb @ self.text.T)[:, 0]


def free_latent(params, x, cond):
    """A reward on the latents that costs nothing."""
    return -jnp.mean(jnp.square(x), axis=(1, 2, 3))


def mean_colour(params, images, cond):
    """A reward on decoded images that costs nothing beyond the decode."""
    return -jnp.mean(jnp.square(images.mean(axis=(2, 3))), axis=-1)


def reward_rows(folder: Path) -> list[str]:
    ref, _, folder = C._build(folder)
    ours = rclip.pickscore(folder, C.PROMPT)
    theirs = TorchPickScore(ref, C.PROMPT)
    rows = []
    for n in REWARD_N:
        images = np.random.default_rng(n).uniform(-1, 1, (n, 3, T.IMAGE_SIZE, T.IMAGE_SIZE))
        images = images.astype(np.float32)
        x_j, x_t = jnp.asarray(images), torch.from_numpy(images)
        diff = np.abs(np.asarray(jax_reward(ours, x_j)) - theirs(x_t).numpy()).max()

        def torch_threads(x, threads):
            torch.set_num_threads(threads)
            return theirs(x)

        med, per_round = interleaved(
            {
                "jax": lambda x=x_j: jax_reward(ours, x),
                "torch": lambda x=x_t: torch_threads(x, THREADS),
                "torch-1": lambda x=x_t: torch_threads(x, 1),
            },
            rounds=9,
            budget=0.1,
        )
        rows.append(
            f"| {n} | {n / med['torch']:.0f} | {n / med['torch-1']:.0f} | {n / med['jax']:.0f} "
            f"| {median_ratio(per_round, 'torch', 'jax'):.2f} "
            f"| {median_ratio(per_round, 'torch-1', 'jax'):.2f} | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def share_rows(clip_folder: Path, sd3_folder: Path) -> list[str]:
    pipe = load_text_to_image(sd3_folder, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    cond = pipe.encode_prompt("a photo of a red car")
    flow = pipe.flow(T.IMAGE_SIZE, T.IMAGE_SIZE, guidance_scale=3.5)
    grid = pipe.grid(STEPS, T.IMAGE_SIZE, T.IMAGE_SIZE)
    ps = rclip.pickscore(clip_folder, C.PROMPT)
    rewards = {
        "free": Reward(None, free_latent, "free"),
        "decode": decoded_reward(pipe, mean_colour, None, "decode"),
        "pickscore": decoded_reward(pipe, ps.apply, ps.params, "pickscore"),
    }
    sampler = fk.sampler(FK_N, STEPS, "max", "multinomial")
    key = jax.random.key(0)
    diffusion = I.diffusion("square", 1.0)
    fns = {}
    for name, reward in rewards.items():
        params = fk.make_params(flow, reward, grid, diffusion, 1.0, cond=cond)
        fk.check_params(params, sampler)
        fns[name] = lambda p=params: _run(key, sampler, p)
    med, _ = interleaved(fns, rounds=9, budget=0.2)
    total = med["pickscore"]
    decode = med["decode"] - med["free"]
    clip = med["pickscore"] - med["decode"]
    row = (
        f"| {FK_N} | {STEPS} | {med['free'] * 1e3:.1f} | {med['decode'] * 1e3:.1f} "
        f"| {total * 1e3:.1f} | {decode / total:.1%} | {clip / total:.1%} "
        f"| {(decode + clip) / total:.1%} |"
    )
    print(row, flush=True)
    return [row]


def main() -> None:
    torch.set_num_threads(THREADS)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
            f"torch.set_num_threads({THREADS}), transformers {transformers.__version__}; the "
            "machine is shared with other jobs (absolute times are noisy, the ratios less)."
        )
        print()
        print(
            "PickScore on the tiny random CLIP (tests/rewards/test_reward_clip.py), N images of "
            f"{T.IMAGE_SIZE} x {T.IMAGE_SIZE} in [-1, 1]; medians of 9 alternating rounds:"
        )
        print()
        print(
            f"| N | PyTorch, {THREADS} threads (evaluations / s) | PyTorch, 1 thread "
            f"| tts-jax | tts-jax / PyTorch ({THREADS} threads) | tts-jax / PyTorch (1 thread) "
            "| max abs diff |"
        )
        print("|---|---|---|---|---|---|---|")
        reward_rows(tmp / "clip")
        print()
        print(
            "Share of FK steering spent in the reward, tiny SD3 pipeline (CFG, 2N rows), "
            "adaptive resampling (a reward call after each step), medians of 9 alternating "
            "rounds:"
        )
        print()
        print(
            "| N | steps | FK, free latent reward (ms) | FK, VAE decode + free reward (ms) "
            "| FK, VAE decode + PickScore (ms) | decode share | PickScore share "
            "| reward share |"
        )
        print("|---|---|---|---|---|---|---|---|")
        torch.set_num_threads(1)  # building the folders only
        sd3 = T.make_tiny_sd3(tmp / "sd3")
        torch.set_num_threads(THREADS)
        share_rows(tmp / "clip", sd3)


if __name__ == "__main__":
    main()

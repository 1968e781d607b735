"""Train the two embedded digit classifiers (the ``digits-verifier`` and ``digits-heldout`` assets).

- ``digits-verifier``: a small CNN trained on part ``"a"`` of the seeded digits split; the reward
  that steering / search optimizes.
- ``digits-heldout``: an MLP trained on the disjoint part ``"b"``; the held-out evaluator that
  search never sees (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling
  Denoising Steps": report held-out verifiers, since optimizing one verifier can hack it).

Each is evaluated on the other part (digits it never trained on). Light augmentation (random shifts
of up to one pixel, Gaussian pixel noise, clipped to the pixel range [-1, 1]) makes them robust to
imperfect generated samples. Each folder gets ``config.json``, ``model.safetensors`` and
``metrics.json`` (held-out accuracy, clean and with noise, and the training recipe).

Run: ``python -m tts_jax.app.training.digits_classifiers [--out DIR] [--install]`` (about a
minute on 2 CPU cores). Writes the folders ``digits-verifier/`` and ``digits-heldout/`` into
``--out`` (default ``outputs/train/digits-classifiers``); ``--install`` then copies their files into
``tts_jax/assets/digits-verifier`` and ``tts_jax/assets/digits-heldout``, which are never written
without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tts_jax.app.data.digits import Digits, split_digits
from tts_jax.app.training.common import add_output_args, check_out, install_asset
from tts_jax.models.classifier import ClassifierConfig, build_module, save_classifier

NAME = "digits-classifiers"
EXPORTED = ("config.json", "model.safetensors", "metrics.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Recipe for one classifier (all of it is written to ``metrics.json``)."""

    name: str
    model: ClassifierConfig
    part: str
    split_seed: int = 0
    seed: int = 0
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    max_shift: int = 1
    max_noise: float = 0.2

    def __post_init__(self):
        if self.part not in ("a", "b"):
            raise ValueError(f"part must be 'a' or 'b', got {self.part!r}")
        if min(self.steps, self.batch_size) < 1 or self.learning_rate <= 0:
            raise ValueError(f"steps, batch_size and learning_rate must be positive: {self}")
        if self.max_shift < 0 or self.max_noise < 0:
            raise ValueError(f"augmentation sizes must be non-negative: {self}")


CONFIGS = (
    TrainConfig(
        name="digits-verifier",
        model=ClassifierConfig(architecture="cnn", hidden=(16, 32, 64), features=32),
        part="a",
        seed=1,
    ),
    TrainConfig(
        name="digits-heldout",
        model=ClassifierConfig(architecture="mlp", hidden=(256,), features=64),
        part="b",
        seed=2,
    ),
)


def augment(key: jax.Array, x: jax.Array, max_shift: int, max_noise: float) -> jax.Array:
    """Random integer shifts (background-padded) and Gaussian noise, clipped to [-1, 1].

    Args:
        key: PRNG key.
        x: ``Float[B, C, H, W]`` in [-1, 1].
        max_shift: shifts are uniform in ``[-max_shift, max_shift]`` per axis.
        max_noise: noise std is uniform in ``[0, max_noise]`` per image.

    Returns:
        ``Float[B, C, H, W]``.
    """
    k_shift, k_sigma, k_eps = jax.random.split(key, 3)
    b, c, h, w = x.shape
    s = max_shift
    padded = jnp.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)
    offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * s + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (0, o[0], o[1]), (c, h, w))
    shifted = jax.vmap(crop)(padded, offsets)
    sigma = jax.random.uniform(k_sigma, (b, 1, 1, 1), maxval=max_noise)
    return jnp.clip(shifted + sigma * jax.random.normal(k_eps, x.shape), -1.0, 1.0)


def accuracy(module: nnx.Module, data: Digits) -> float:
    logits, _ = module(jnp.asarray(data.images))
    return round(float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data.labels))), 4)


def train(cfg: TrainConfig, data: Digits) -> nnx.Module:
    """Optimize ``cfg.model`` on ``data`` with AdamW and a warmup-cosine schedule."""
    graphdef, params = nnx.split(build_module(cfg.model, cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.steps // 20, cfg.steps
    )
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = opt.init(params)
    images, labels = jnp.asarray(data.images), jnp.asarray(data.labels)
    num_classes = cfg.model.num_classes

    def loss_fn(params, x, y):
        logits, _ = nnx.merge(graphdef, params)(x)
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), cfg.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_aug = jax.random.split(key)
        idx = jax.random.choice(k_idx, images.shape[0], (cfg.batch_size,), replace=False)
        x = augment(k_aug, images[idx], cfg.max_shift, cfg.max_noise)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[idx])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(cfg.seed)
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        if (i + 1) % 500 == 0:
            print(f"  {cfg.name} step {i + 1}/{cfg.steps} loss {float(loss):.4f}")
    return nnx.merge(graphdef, params)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nRun: " + __doc__.split("Run: ")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = " and ".join(f"tts_jax/assets/{cfg.name}" for cfg in CONFIGS)
    add_output_args(parser, NAME, names)
    args = parser.parse_args()
    out_root = check_out(args.out)
    for cfg in CONFIGS:
        start = time.perf_counter()
        train_set, heldout = split_digits(cfg.part, cfg.split_seed)
        module = train(cfg, train_set)
        noisy = Digits(
            np.clip(
                heldout.images + 0.1 * np.random.default_rng(0).normal(size=heldout.images.shape),
                -1.0,
                1.0,
            ).astype(np.float32),
            heldout.labels,
        )
        metrics = {
            "heldout_accuracy": accuracy(module, heldout),
            "heldout_accuracy_noise_0.1": accuracy(module, noisy),
            "num_train": len(train_set.labels),
            "num_heldout": len(heldout.labels),
            "num_params": sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param))),
            "train_seconds": round(time.perf_counter() - start, 1),
            "train": {**dataclasses.asdict(cfg), "model": cfg.model.to_dict()},
        }
        out = out_root / cfg.name
        save_classifier(out, cfg.model, module)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"{cfg.name}: {json.dumps({k: v for k, v in metrics.items() if k != 'train'})}")
    print(f"wrote {out_root}")
    for cfg in CONFIGS if args.install else ():
        install_asset(out_root / cfg.name, cfg.name, EXPORTED)
    if not args.install:
        print(f"package assets untouched; rerun with --install to copy into {names}")


if __name__ == "__main__":
    main()

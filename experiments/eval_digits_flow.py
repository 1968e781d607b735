"""Quality gates of the embedded digits flow model (``tts_jax/assets/digits-dit``).

Samples with the deterministic ODE (Euler, uniform grid from t = 1 noise to t = 0 data) and
measures, with the **held-out** classifier (never used for training the generator or steering):

- class-conditional accuracy: share of samples of class ``y`` classified as ``y``, without
  guidance (``w = 1``) and with classifier-free guidance (Ho & Salimans 2022); gate >= 0.90;
- the unconditional (null-label) samples' predicted-class histogram, which should be close to the
  data's (about uniform), summarized by its total-variation distance to the data frequencies;
- the Frechet distance in the held-out classifier's feature space (the FID construction of
  Heusel et al. 2017) between samples and real digits, next to the same distance between the two
  real halves of the digits (the floor at this sample size).

Writes ``experiments/digits_flow_eval.json`` and the 10 x 10 grid
``experiments/figures/digits_samples.png`` (row = class, unguided conditional samples).

Run: ``python experiments/eval_digits_flow.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from tts_jax.app.data.digits import NUM_CLASSES, load_digits, split_digits
from tts_jax.interpolants import ode, uniform_grid
from tts_jax.models.base import FlowModel
from tts_jax.models.wrappers import with_guidance
from tts_jax.models.zoo import load_digits_flow
from tts_jax.rewards.classifier import load_digits_heldout
from tts_jax.rewards.metrics import classifier_features, frechet_distance
from tts_jax.samplers.image.integrate import initial_noise, solve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)

EXPERIMENTS = Path(__file__).resolve().parent
OUT_JSON = EXPERIMENTS / "digits_flow_eval.json"
OUT_PNG = EXPERIMENTS / "figures" / "digits_samples.png"
SEED = 0
NUM_STEPS = 50
PER_CLASS = 100
NUM_UNCONDITIONAL = 900  # about the size of one real half, for comparable Frechet distances
GUIDANCE_SCALES = (1.5, 2.0, 3.0)
ACCURACY_GATE = 0.90


@jax.jit
def sample(key: jax.Array, model: FlowModel, labels: jax.Array) -> jax.Array:
    """Class-conditional ODE samples ``[N, 1, 8, 8]`` for ``labels Int[N]``."""
    x = initial_noise(key, model, labels.shape[0])
    return solve(key, model, x, uniform_grid(NUM_STEPS), ode(), labels)


@functools.partial(jax.jit, static_argnums=2)
def sample_unconditional(key: jax.Array, model: FlowModel, num: int) -> jax.Array:
    """``num`` unconditional (null-label) ODE samples ``[num, 1, 8, 8]``."""
    x = initial_noise(key, model, num)
    return solve(key, model, x, uniform_grid(NUM_STEPS), ode(), None)


def predictions(samples: np.ndarray) -> np.ndarray:
    """Held-out classifier labels ``Int[N]`` of ``samples [N, 1, 8, 8]`` (clipped to [-1, 1])."""
    logits, _ = load_digits_heldout()(jnp.clip(jnp.asarray(samples), -1.0, 1.0))
    return np.asarray(jnp.argmax(logits, axis=-1))


def conditional_report(samples: np.ndarray, labels: np.ndarray) -> dict:
    pred = predictions(samples)
    per_class = [float(np.mean(pred[labels == c] == c)) for c in range(NUM_CLASSES)]
    return {
        "accuracy": round(float(np.mean(pred == labels)), 4),
        "min_class_accuracy": round(min(per_class), 4),
        "per_class_accuracy": [round(a, 4) for a in per_class],
    }


def histogram_report(samples: np.ndarray, data_labels: np.ndarray) -> dict:
    counts = np.bincount(predictions(samples), minlength=NUM_CLASSES)
    freq = counts / counts.sum()
    data_freq = np.bincount(data_labels, minlength=NUM_CLASSES) / len(data_labels)
    return {
        "predicted_class_counts": counts.tolist(),
        "total_variation_to_data": round(0.5 * float(np.abs(freq - data_freq).sum()), 4),
        "min_share": round(float(freq.min()), 4),
        "max_share": round(float(freq.max()), 4),
    }


def frechet_report(uncond: np.ndarray, cond: np.ndarray) -> dict:
    heldout = load_digits_heldout()
    real_a, real_b = split_digits("a")
    feats_a = classifier_features(heldout, real_a.images)
    return {
        "reference_images": f"digits split part a ({len(real_a.labels)} images)",
        "unconditional_samples": round(
            frechet_distance(classifier_features(heldout, uncond), feats_a), 3
        ),
        "conditional_samples": round(
            frechet_distance(classifier_features(heldout, cond[: len(uncond)]), feats_a), 3
        ),
        "real_part_b_floor": round(
            frechet_distance(classifier_features(heldout, real_b.images), feats_a), 3
        ),
    }


def save_grid(samples: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """10 x 10 grid: row ``c`` shows the first 10 samples of class ``c``."""
    fig, axes = plt.subplots(NUM_CLASSES, 10, figsize=(6, 6))
    for c in range(NUM_CLASSES):
        for j, img in enumerate(samples[labels == c][:10]):
            axes[c, j].imshow(np.clip(img[0], -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            axes[c, j].axis("off")
    fig.suptitle(f"digits-dit, class-conditional ODE ({NUM_STEPS} Euler steps), row = class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    start = time.perf_counter()
    key = jax.random.key(SEED)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), PER_CLASS)
    plain = load_digits_flow()
    cond = np.asarray(sample(jax.random.fold_in(key, 0), plain, jnp.asarray(labels)))
    guided = load_digits_flow(guided=True)
    report = {
        "sampler": f"ODE, Euler, {NUM_STEPS} uniform steps, seed {SEED}",
        "samples_per_class": PER_CLASS,
        "all_finite": bool(np.isfinite(cond).all()),
        "conditional": {"no_guidance": conditional_report(cond, labels)},
    }
    for w in GUIDANCE_SCALES:
        x = sample(jax.random.fold_in(key, 0), with_guidance(guided, w), jnp.asarray(labels))
        report["conditional"][f"cfg_{w}"] = conditional_report(np.asarray(x), labels)
    uncond = np.asarray(sample_unconditional(jax.random.fold_in(key, 1), plain, NUM_UNCONDITIONAL))
    report["unconditional_histogram"] = histogram_report(uncond, load_digits().labels)
    report["frechet_distance_heldout_features"] = frechet_report(uncond, cond)
    accuracy = report["conditional"]["no_guidance"]["accuracy"]
    report["gate"] = {"accuracy_threshold": ACCURACY_GATE, "passed": accuracy >= ACCURACY_GATE}
    report["eval_seconds"] = round(time.perf_counter() - start, 1)
    OUT_JSON.write_text(json.dumps(report, indent=2) + "\n")
    save_grid(cond, labels, OUT_PNG)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

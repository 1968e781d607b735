"""Train the embedded digits flow model (the ``digits-dit`` asset).

A small class-conditional DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers";
diffusers ``DiTTransformer2DModel`` layout, :mod:`tts_jax.models.dit`) learns the velocity of the
linear path by flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"):

    x_t = (1 - t) x0 + t eps,   loss = || v(x_t, 1000 t, y) - (eps - x0) ||^2,

with t = 1 noise and t = 0 data, as :func:`tts_jax.models.wrappers.velocity_dit_flow` expects.

Recipe:
- data: **all** 1797 scikit-learn digits (``[N, 1, 8, 8]`` in [-1, 1]). The classifiers are only
  evaluators of the generator, so the generator gets the whole data distribution; note that the
  held-out classifier was trained on half of these images (split part "b").
- times: logit-normal ``t = sigmoid(n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3), which spends the
  training signal on intermediate noise levels.
- labels: the class, replaced by the null label ``config.null_class`` with probability
  ``label_dropout``, so one network serves conditional, unconditional and classifier-free-guided
  sampling (Ho & Salimans 2022).
- optimizer: AdamW with linear warmup and cosine decay, gradient clipping; the exported weights are
  an exponential moving average (EMA) of the iterates.
- determinism: the step-``k`` batch, times, noises and label drops all come from
  ``fold_in(key(seed), k)``, so a run resumed from a checkpoint follows the same trajectory.
- checkpoints: orbax, every ``checkpoint_every`` steps under ``<out>/checkpoints``; a killed run
  rerun with the same ``--out`` resumes from the latest one. ``--fresh`` discards them.

Run: ``python -m tts_jax.app.training.digits_flow [--out DIR] [--install] [--fresh]`` (about 18
minutes on 2 shared CPU cores). Writes ``config.json`` + ``diffusion_pytorch_model.safetensors``
(EMA weights) and ``training.json`` into ``--out`` (default ``outputs/train/digits-dit``);
``--install`` then copies those three files into ``tts_jax/assets/digits-dit``, which is never
written without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tts_jax.app.data.digits import NUM_CLASSES, load_digits
from tts_jax.app.training.common import add_output_args, check_out, install_asset
from tts_jax.models.dit import DiT, DiTConfig, init_dit, save_dit
from tts_jax.models.wrappers import FLOW_TIMESTEP_SCALE

NAME = "digits-dit"
EXPORTED = ("config.json", "diffusion_pytorch_model.safetensors", "training.json")
PACKAGES = ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "scikit-learn", "safetensors")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The full training recipe (written to ``training.json`` and checked on resume)."""

    model: DiTConfig = DiTConfig(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    seed: int = 0
    steps: int = 5000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.2
    checkpoint_every: int = 500
    log_every: int = 100

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.checkpoint_every, self.log_every) < 1:
            raise ValueError(f"steps, batch_size and intervals must be positive: {self}")
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"label_dropout and ema_decay must be in [0, 1): {self}")
        if self.steps % self.log_every or self.checkpoint_every % self.log_every:
            raise ValueError("steps and checkpoint_every must be multiples of log_every")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def flow_matching_loss(
    graphdef: nnx.GraphDef, params: dict, x0: jax.Array, labels: jax.Array, key: jax.Array
) -> jax.Array:
    """Conditional flow-matching loss on the linear path (Lipman et al. 2023).

    Args:
        graphdef, params: the DiT (``nnx.split`` graph and pure-dict weights).
        x0: ``[B, 1, 8, 8]`` data.
        labels: ``[B]`` int labels (already with null labels for the dropped ones).
        key: PRNG key for times and noise.

    Returns:
        Scalar mean squared error between predicted and target velocity ``eps - x0``.
    """
    k_t, k_eps = jax.random.split(key)
    t = jax.nn.sigmoid(jax.random.normal(k_t, x0.shape[:1]))  # logit-normal times
    eps = jax.random.normal(k_eps, x0.shape)
    tt = t[:, None, None, None]
    x_t = (1.0 - tt) * x0 + tt * eps
    v = nnx.merge(graphdef, params)(x_t, t * FLOW_TIMESTEP_SCALE, labels)
    return jnp.mean(jnp.square(v - (eps - x0)))


def make_batch(cfg: TrainConfig, key: jax.Array, images: jax.Array, labels: jax.Array):
    """``(x0 [B, 1, 8, 8], labels [B], loss key)`` for one step; labels dropped to the null class
    with probability ``cfg.label_dropout``."""
    k_idx, k_drop, k_loss = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
    drop = jax.random.bernoulli(k_drop, cfg.label_dropout, (cfg.batch_size,))
    y = jnp.where(drop, cfg.model.null_class, labels[idx])
    return images[idx], y, k_loss


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, end_value=0.05 * cfg.learning_rate
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def make_train_step(cfg: TrainConfig, graphdef: nnx.GraphDef, opt, images, labels):
    """The jitted update ``(state, step) -> (state, loss)``; ``state`` = params, opt_state, ema.

    The EMA decay is warmed up as ``min(decay, (1 + k) / (10 + k))`` so early averages are not
    dominated by the random initialisation.
    """
    base_key = jax.random.key(cfg.seed)

    @jax.jit
    def train_step(state: dict, step: jax.Array):
        x0, y, k_loss = make_batch(cfg, jax.random.fold_in(base_key, step), images, labels)
        loss, grads = jax.value_and_grad(flow_matching_loss, argnums=1)(
            graphdef, state["params"], x0, y, k_loss
        )
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        return {"params": params, "opt_state": opt_state, "ema": ema}, loss

    return train_step


def init_state(cfg: TrainConfig, opt) -> tuple[nnx.GraphDef, dict]:
    graphdef, params = nnx.split(init_dit(cfg.model, cfg.seed))
    params = nnx.to_pure_dict(params)
    return graphdef, {"params": params, "opt_state": opt.init(params), "ema": params}


def checkpoint_manager(directory: Path, fresh: bool) -> ocp.CheckpointManager:
    """Orbax manager of ``directory`` (emptied first if ``fresh``)."""
    directory = directory.resolve()
    if fresh and directory.exists():
        shutil.rmtree(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    return ocp.CheckpointManager(directory, options=options)


def restore(manager: ocp.CheckpointManager, cfg: TrainConfig, state: dict):
    """``(state, log)`` from the latest checkpoint, or the fresh ones if there is none.

    Raises:
        ValueError: the checkpoint was written by a different recipe.
    """
    log = {"config": cfg.to_dict(), "losses": [], "seconds": 0.0, "resumed_at": []}
    step = manager.latest_step()
    if step is None:
        return 0, state, log
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), log=ocp.args.JsonRestore()
        ),
    )
    if restored.log["config"] != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{manager.directory} holds a different recipe; rerun with --fresh")
    restored.log["resumed_at"].append(step)
    print(f"resumed from step {step}")
    return step, restored.state, restored.log


def save(manager: ocp.CheckpointManager, step: int, state: dict, log: dict) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), log=ocp.args.JsonSave(log))
    manager.save(step, args=args)
    manager.wait_until_finished()


def loss_summary(losses: list[float], log_every: int) -> dict:
    """Window means of the loss (one per ``log_every`` steps), thinned to ~20 points."""
    stride = max(1, len(losses) // 20)
    return {
        "window_steps": log_every,
        "first_window": losses[0],
        "last_window": losses[-1],
        "min_window": min(losses),
        "curve": {str((i + 1) * log_every): losses[i] for i in range(0, len(losses), stride)},
    }


def export(cfg: TrainConfig, graphdef: nnx.GraphDef, state: dict, log: dict, out: Path) -> None:
    """EMA weights -> ``config.json`` + safetensors; the recipe and loss curve -> training.json."""
    model: DiT = nnx.merge(graphdef, state["ema"])
    save_dit(out, cfg.model, model)
    record = {
        "data": "all 1797 scikit-learn digits (tts_jax.app.data.digits.load_digits)",
        "objective": "flow matching, linear path, velocity eps - x0, timestep = 1000 t",
        "exported_weights": f"EMA (decay {cfg.ema_decay})",
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state["ema"]))),
        "train_seconds": round(log["seconds"], 1),
        "resumed_at_steps": log["resumed_at"],
        "loss": loss_summary(log["losses"], cfg.log_every),
        "recipe": cfg.to_dict(),
        "versions": {p: importlib.metadata.version(p) for p in PACKAGES},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train(cfg: TrainConfig, fresh: bool, out: Path) -> None:
    """Runs (or resumes, from ``out/checkpoints``) the optimization and exports into ``out``."""
    data = load_digits()
    images, labels = jnp.asarray(data.images), jnp.asarray(data.labels)
    opt = make_optimizer(cfg)
    graphdef, state = init_state(cfg, opt)
    manager = checkpoint_manager(out / "checkpoints", fresh)
    start, state, log = restore(manager, cfg, state)
    train_step = make_train_step(cfg, graphdef, opt, images, labels)
    window, tic = [], time.perf_counter()
    for step in range(start, cfg.steps):
        state, loss = train_step(state, jnp.asarray(step, jnp.int32))
        window.append(loss)
        if (step + 1) % cfg.log_every == 0:
            log["losses"].append(round(float(jnp.mean(jnp.stack(window))), 5))
            window = []
            print(f"step {step + 1}/{cfg.steps} loss {log['losses'][-1]:.4f}", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            log["seconds"] += time.perf_counter() - tic
            tic = time.perf_counter()
            save(manager, step + 1, state, log)
    export(cfg, graphdef, state, log, out)
    print(f"exported to {out} after {log['seconds']:.0f} s of training")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nRun: " + __doc__.split("Run: ")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_args(parser, NAME, f"tts_jax/assets/{NAME}")
    parser.add_argument(
        "--fresh", action="store_true", help="discard existing checkpoints under <out>/checkpoints"
    )
    args = parser.parse_args()
    out = check_out(args.out)
    train(TrainConfig(), args.fresh, out)
    if args.install:
        install_asset(out, NAME, EXPORTED)
    else:
        print(f"package assets untouched; rerun with --install to copy into assets/{NAME}")


if __name__ == "__main__":
    main()

"""Train the embedded arithmetic policy LM (the ``arith-lm`` asset).

A small Qwen2-style decoder (GQA, tied embeddings, attention biases; stored in the Llama layout,
see ``TrainConfig.model_config``) is trained from scratch on generated
multi-step arithmetic problems with worked solutions (:mod:`tts_jax.app.tasks.arithmetic`): the loss
is next-token cross-entropy on the solution tokens and the EOS only, never on the prompt. AdamW
with a linear warmup and cosine decay (Loshchilov & Hutter 2019), gradients clipped to norm 1.

The run is deterministic in its seed: the batch of step ``i`` is drawn from a fixed problem pool
by ``np.random.default_rng([seed, i])``. Orbax checkpoints (parameters + optimizer state) go to
``<out>/checkpoints/arith-lm-<config hash>/`` every ``checkpoint_every`` steps, with a JSON-lines
loss log beside them, so a killed run rerun with the same ``--out`` resumes where it stopped and a
changed recipe starts a fresh directory. The model is sized to be *good but fallible* on
:data:`tts_jax.app.tasks.arith_models.ARITH_TASK`:
single samples at temperature 0.8 fail often while most
problems have a correct answer among 64 samples, the regime where inference-time search pays off.

The export (``config.json``, ``model.safetensors``, ``generation_config.json`` and
``training.json``, plus a copy of the tokenizer files it was trained with, read from
``--tokenizer``, default ``tts_jax/assets/arith-lm``) goes into ``--out`` (default
``outputs/train/arith-lm``) and loads with ``transformers.AutoTokenizer`` /
``AutoModelForCausalLM`` as well as :func:`tts_jax.app.tasks.arith_models.load_arith_policy`.
``--install`` then copies these files into ``tts_jax/assets/arith-lm``, which is never written
without it.

Run: ``python -m tts_jax.app.training.arith_lm [--out DIR] [--install]`` then a second phase with a
fresh optimizer, ``python -m tts_jax.app.training.arith_lm --steps 400 --learning-rate 2e-3
--init-from outputs/train/arith-lm [--install]`` (each about 12-15 minutes on 2 busy CPU cores).
The shipped phase 1 ran as ``model_type="qwen2"`` (no o_proj bias) and was converted exactly to
this layout (zero o_proj bias) before phase 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tts_jax.app.runs import append_jsonl, environment, read_jsonl, to_jsonable, write_json
from tts_jax.app.tasks.arith_data import make_sft_batch, make_splits
from tts_jax.app.tasks.arith_models import ARITH_LM_DIR, ARITH_TASK, N_EVAL_PROBLEMS
from tts_jax.app.tasks.arith_tokenizer import MAX_LENGTH, ArithTokenizer
from tts_jax.app.training.arith_tokenizer import TOKENIZER_FILES
from tts_jax.app.training.common import add_output_args, check_out, install_asset
from tts_jax.models.lm import (
    LM,
    LMConfig,
    hidden_states,
    init_cache,
    lm_logits,
    load_lm,
    save_lm,
)

NAME = "arith-lm"
EXPORTED = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "training.json",
    *TOKENIZER_FILES,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The whole recipe (written to ``training.json``; its hash names the checkpoint folder)."""

    seed: int = 0
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    end_lr_fraction: float = 0.05
    weight_decay: float = 0.01
    pool_size: int = 40_000
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    checkpoint_every: int = 50
    log_every: int = 25
    init_from: str | None = None

    def __post_init__(self):
        counts = (self.steps, self.batch_size, self.pool_size, self.checkpoint_every)
        if min(*counts, self.log_every) < 1:
            raise ValueError(f"counts must be positive: {self}")
        if not 0 <= self.warmup_fraction < 1 or self.learning_rate <= 0:
            raise ValueError(f"need 0 <= warmup_fraction < 1 and learning_rate > 0: {self}")

    def model_config(self, tokenizer: ArithTokenizer) -> LMConfig:
        """The architecture for this tokenizer: Qwen2's (q/k/v biases) in the Llama layout.

        transformers 5 ``AutoTokenizer`` swaps in ``Qwen2Tokenizer`` (Qwen2's own pre-tokenizer
        regex, which breaks our merges) for any folder whose ``config.json`` says ``qwen2``, so
        the policy is stored as ``LlamaForCausalLM`` with ``attention_bias`` (q/k/v/o biases).
        """
        return LMConfig(
            model_type="llama",
            attention_bias=True,
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            tie_word_embeddings=True,
            max_position_embeddings=MAX_LENGTH,
            eos_token_id=(tokenizer.eos_id,),
            pad_token_id=tokenizer.pad_id,
        )

    def digest(self, tokenizer: ArithTokenizer) -> str:
        """Short hash of the recipe, the architecture, the vocabulary and the task difficulty."""
        text = json.dumps(
            to_jsonable(
                {
                    "train": self,
                    "task": ARITH_TASK,
                    "model": self.model_config(tokenizer),
                    "vocab": tokenizer.hf.get_vocab(),
                }
            ),
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def next_token_loss(model: nnx.Module, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of the masked target tokens given their prefixes.

    Args:
        model: :class:`LM`.
        input_ids: ``int32[B, L]`` right-padded sequences.
        loss_mask: ``bool[B, L]``, True on target tokens (solution + EOS).

    Returns:
        Scalar loss.
    """
    n, t = input_ids.shape
    hidden, _ = hidden_states(model, input_ids[:, :-1], init_cache(model.config, n, t - 1))
    ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits(model, hidden), input_ids[:, 1:])
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip to global norm 1, then AdamW on a warmup + cosine schedule."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        int(cfg.warmup_fraction * cfg.steps),
        cfg.steps,
        end_value=cfg.learning_rate * cfg.end_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay)
    )


def batch_indices(cfg: TrainConfig, step: int) -> np.ndarray:
    """Pool rows of step ``step``'s batch (a pure function of seed and step: resumable)."""
    return np.random.default_rng([cfg.seed, step]).integers(0, cfg.pool_size, cfg.batch_size)


def initial_model(cfg: TrainConfig, tokenizer: ArithTokenizer) -> LM:
    """Random init from the seed, or the weights of an earlier phase (``cfg.init_from``)."""
    if cfg.init_from is None:
        return LM(cfg.model_config(tokenizer), rngs=nnx.Rngs(cfg.seed))
    config, model = load_lm(cfg.init_from)
    if config != cfg.model_config(tokenizer):
        raise ValueError(f"{cfg.init_from} holds another architecture: {config}")
    return model


def restore_or_init(manager: ocp.CheckpointManager, params, opt_state):
    """``(first_step, params, opt_state)`` from the latest checkpoint, or the fresh state."""
    step = manager.latest_step()
    if step is None:
        return 0, params, opt_state
    target = {"params": params, "opt_state": opt_state}
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    print(f"resumed from step {step}")
    return step, restored["params"], restored["opt_state"]


def train(cfg: TrainConfig, tokenizer: ArithTokenizer, run_dir: pathlib.Path) -> LM:
    """Runs (or resumes) the optimization and returns the trained model."""
    train_problems, _ = make_splits(cfg.pool_size, N_EVAL_PROBLEMS, ARITH_TASK)
    pool = make_sft_batch(tokenizer, train_problems, MAX_LENGTH)
    width = int(pool.attention_mask.sum(1).max())
    input_ids, loss_mask = pool.input_ids[:, :width], pool.loss_mask[:, :width]
    print(f"pool: {cfg.pool_size} problems, longest {width} tokens")

    graphdef, params = nnx.split(initial_model(cfg, tokenizer))
    opt = make_optimizer(cfg)
    manager = ocp.CheckpointManager(
        run_dir.resolve() / "orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    start, params, opt_state = restore_or_init(manager, params, opt.init(params))

    @jax.jit
    def step_fn(params, opt_state, ids, mask):
        loss_fn = lambda p: next_token_loss(nnx.merge(graphdef, p), ids, mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tic, losses = time.perf_counter(), []
    for step in range(start, cfg.steps):
        idx = batch_indices(cfg, step)
        params, opt_state, loss = step_fn(params, opt_state, input_ids[idx], loss_mask[idx])
        losses.append(loss)
        if (step + 1) % cfg.log_every == 0:
            mean = float(jnp.mean(jnp.stack(losses)))
            seconds, tic, losses = time.perf_counter() - tic, time.perf_counter(), []
            append_jsonl(
                run_dir / "log.jsonl", {"step": step + 1, "loss": mean, "seconds": seconds}
            )
            print(f"step {step + 1}/{cfg.steps} loss {mean:.4f} ({seconds:.1f} s)", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            manager.save(
                step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})
            )
    manager.wait_until_finished()
    return nnx.merge(graphdef, params)


def loss_summary(log: list[dict]) -> dict:
    """First / last logged losses, a coarse curve and the summed logged wall time."""
    by_step = {r["step"]: r for r in log}  # a resumed run may log a step twice
    records = [by_step[s] for s in sorted(by_step)]
    stride = max(1, len(records) // 12)
    return {
        "first": records[0]["loss"],
        "final": records[-1]["loss"],
        "curve": [[r["step"], round(r["loss"], 4)] for r in records[::stride]],
        "train_seconds": round(sum(r["seconds"] for r in records), 1),
    }


def export(
    cfg: TrainConfig,
    tokenizer: ArithTokenizer,
    model: LM,
    log: list[dict],
    previous: dict | None,
    out: pathlib.Path,
    tokenizer_dir: pathlib.Path,
) -> None:
    """Writes the transformers folder, ``training.json`` and a copy of the tokenizer files."""
    from transformers import GenerationConfig

    config = cfg.model_config(tokenizer)
    save_lm(out, config, model)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).resolve() != (out / name).resolve():
            shutil.copyfile(tokenizer_dir / name, out / name)
    GenerationConfig(
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=None
    ).save_pretrained(str(out))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    write_json(
        out / "training.json",
        {
            "recipe": cfg,
            "task": ARITH_TASK,
            "num_params": num_params,
            "loss": loss_summary(log),
            "environment": environment(),
            "script": "tts_jax.app.training.arith_lm",
            "previous_phase": previous,
        },
    )
    print(f"wrote {out} ({num_params} parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nRun: " + __doc__.split("Run: ")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_args(parser, NAME, f"tts_jax/assets/{NAME}")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument(
        "--init-from",
        type=pathlib.Path,
        default=None,
        help="continue from an exported folder (a new phase, fresh optimizer)",
    )
    parser.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        default=ARITH_LM_DIR,
        metavar="DIR",
        help="folder to read the tokenizer from, e.g. the --out of "
        "tts-jax train arith-tokenizer (default: the asset %(default)s; only read)",
    )
    args = parser.parse_args()
    out = check_out(args.out)
    cfg = TrainConfig(
        steps=args.steps,
        seed=args.seed,
        learning_rate=args.learning_rate,
        init_from=None if args.init_from is None else str(args.init_from),
    )
    tokenizer = ArithTokenizer.load(args.tokenizer)
    run_dir = out / "checkpoints" / f"arith-lm-{cfg.digest(tokenizer)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(to_jsonable(cfg), indent=2))
    previous = run_dir / "previous_training.json"
    if cfg.init_from is not None and not previous.is_file():
        shutil.copy(pathlib.Path(cfg.init_from) / "training.json", previous)
    model = train(cfg, tokenizer, run_dir)
    export(
        cfg,
        tokenizer,
        model,
        read_jsonl(run_dir / "log.jsonl"),
        json.loads(previous.read_text()) if previous.is_file() else None,
        out,
        args.tokenizer,
    )
    if args.install:
        install_asset(out, NAME, EXPORTED)
    else:
        print(f"package assets untouched; rerun with --install to copy into assets/{NAME}")


if __name__ == "__main__":
    main()

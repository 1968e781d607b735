"""Train the embedded arithmetic process reward model (the ``arith-prm`` asset).

Data: the trained policy (``--policy``, default the asset ``tts_jax/assets/arith-lm``) samples
solutions of training problems (never the held-out split) at temperatures 0.8 and 1.2, so the PRM
sees the policy's own mistakes. Every step end (newline or EOS) of a sample is labelled by the
exact checker (:func:`tts_jax.app.tasks.arith_data.prm_step_labels` / ``make_prm_batch``): 1 iff the
solution prefix up to it is still correct, so after the first wrong step every label is 0. To
these are added the canonical solutions of the same problems and copies with one result off by a
small delta (``corrupt_solution``): contrast pairs without which the PRM mostly learns problem
difficulty.

Model: a ``Qwen2ForProcessRewardModel`` (:class:`tts_jax.models.lm_reward.RewardModel`, two
classes) whose backbone starts from the policy's weights (use the policy's tokenizer; the folder
has none, since transformers would load it as ``Qwen2Tokenizer``); all of it is trained with
cross-entropy at the labelled step ends. Class 1's probability is the step score Puri et al. 2025
use for particle filtering. There is no separate ORM: the label at the EOS after the answer line is
"every step and the final answer are correct", so the same PRM read at the EOS is the outcome
reward of a finished solution.

Sampled data and orbax checkpoints live in ``<out>/checkpoints/arith-prm-<hash>/``, so a killed
run rerun with the same ``--out`` resumes (same optimizer recipe as the policy: AdamW, warmup +
cosine). The export (``config.json``, ``model.safetensors``, ``training.json``) goes into
``--out`` (default ``outputs/train/arith-prm``); ``--install`` then copies it into
``tts_jax/assets/arith-prm``, which is never written without it.

Run: ``python -m tts_jax.app.training.arith_prm [--out DIR] [--install] [--policy DIR]`` after
``tts-jax train arith-lm`` (under 10 minutes); pass ``--policy outputs/train/arith-lm`` to train
on a policy that is not installed yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tts_jax.app.runs import append_jsonl, environment, read_jsonl, to_jsonable, write_json
from tts_jax.app.tasks.arith_data import PRMBatch, make_prm_batch, make_splits
from tts_jax.app.tasks.arith_models import (
    ARITH_LM_DIR,
    ARITH_TASK,
    N_EVAL_PROBLEMS,
    load_arith_policy,
    sample_solutions,
)
from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer
from tts_jax.app.tasks.arithmetic import ANSWER_PREFIX, STEP_DELIMITER, Problem
from tts_jax.app.training.arith_lm import loss_summary, make_optimizer, restore_or_init
from tts_jax.app.training.common import add_output_args, check_out, install_asset
from tts_jax.models.lm import LM, LMConfig, init_cache
from tts_jax.models.lm_reward import RewardModel, reward_logits, save_reward_model

NAME = "arith-prm"
EXPORTED = ("config.json", "model.safetensors", "training.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The PRM recipe (written to ``training.json``; its hash names the checkpoint folder)."""

    seed: int = 0
    num_problems: int = 3072
    samples_per_problem: int = 2
    temperatures: tuple[float, ...] = (0.8, 1.2)
    sample_batch: int = 512
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-4
    warmup_fraction: float = 0.05
    end_lr_fraction: float = 0.05
    weight_decay: float = 0.01
    checkpoint_every: int = 50
    log_every: int = 25
    corrupted_per_problem: int = 2
    corruption_deltas: tuple[int, ...] = (-10, -2, -1, 1, 2, 10)

    def __post_init__(self):
        if min(self.num_problems, self.samples_per_problem, self.steps, self.batch_size) < 1:
            raise ValueError(f"counts must be positive: {self}")
        if (self.num_problems * self.samples_per_problem) % self.sample_batch:
            raise ValueError(
                f"num_problems * samples_per_problem must be a multiple of sample_batch: {self}"
            )

    def digest(self, policy_dir: pathlib.Path) -> str:
        """Short hash of the recipe, the task and the policy weights it samples from."""
        text = json.dumps(to_jsonable({"train": self, "task": ARITH_TASK}), sort_keys=True)
        policy = (policy_dir / "model.safetensors").read_bytes()
        return hashlib.sha256(text.encode() + policy).hexdigest()[:10]


def sample_training_data(cfg: TrainConfig, policy: LM, tokenizer: ArithTokenizer) -> PRMBatch:
    """Policy samples of training problems, labelled at every step end by the checker."""
    train_problems, _ = make_splits(
        cfg.num_problems, N_EVAL_PROBLEMS, ARITH_TASK, train_seed=cfg.seed + 100
    )
    problems = [p for p in train_problems for _ in range(cfg.samples_per_problem)]
    temps = np.resize(np.asarray(cfg.temperatures, np.float32), len(problems))
    key = jax.random.key(cfg.seed)
    chunks = []
    for start in range(0, len(problems), cfg.sample_batch):
        stop = start + cfg.sample_batch
        chunks.append(
            sample_solutions(
                policy,
                tokenizer,
                problems[start:stop],
                jax.random.fold_in(key, start),
                temperature=temps[start:stop],
            )
        )
    completions = np.concatenate(chunks)
    prompt_width = max(len(tokenizer.encode(p.prompt)) for p in problems)
    return make_prm_batch(tokenizer, problems, completions, prompt_width + completions.shape[1])


def load_or_sample(
    cfg: TrainConfig, policy: LM, tokenizer: ArithTokenizer, run_dir: pathlib.Path
) -> PRMBatch:
    """The labelled samples, cached in ``run_dir/samples.npz``."""
    file = run_dir / "samples.npz"
    if file.is_file():
        with np.load(file) as f:
            return PRMBatch(**{k: f[k] for k in PRMBatch._fields})
    tic = time.perf_counter()
    data = sample_training_data(cfg, policy, tokenizer)
    np.savez(file, **data._asdict())
    print(f"sampled {len(data.input_ids)} solutions in {time.perf_counter() - tic:.1f} s")
    return data


def corrupt_solution(problem: Problem, rng: np.random.Generator, deltas: tuple[int, ...]) -> str:
    """The worked solution with one result (a step or the answer) off by a random delta.

    Later steps are computed correctly from the wrong value, as a policy that slipped once would
    write them, so only the slip itself is visible.
    """
    values = problem.values
    wrong = int(rng.integers(1, len(values)))
    values[wrong] = max(0, values[wrong] + int(rng.choice(deltas)))
    if values[wrong] == problem.values[wrong]:
        values[wrong] += 1
    for i in range(wrong, len(problem.ops)):
        values[i + 1] = Problem(values[i], (problem.ops[i],)).answer
    steps = [f"{values[i]}{op}{x}={values[i + 1]}" for i, (op, x) in enumerate(problem.ops)]
    return STEP_DELIMITER.join([*steps, f"{ANSWER_PREFIX}{values[-1]}"])


def contrast_data(cfg: TrainConfig, tokenizer: ArithTokenizer, width: int) -> PRMBatch:
    """Canonical solutions and corrupted copies of the same training problems.

    Pairs that differ in one result force the PRM to check the arithmetic instead of judging
    how hard the problem looks (with policy samples alone it learns mostly the latter).
    """
    train_problems, _ = make_splits(
        cfg.num_problems, N_EVAL_PROBLEMS, ARITH_TASK, train_seed=cfg.seed + 100
    )
    rng = np.random.default_rng([cfg.seed, 1])
    problems, texts = [], []
    for problem in train_problems:
        problems += [problem] * (1 + cfg.corrupted_per_problem)
        texts += [problem.solution] + [
            corrupt_solution(problem, rng, cfg.corruption_deltas)
            for _ in range(cfg.corrupted_per_problem)
        ]
    completions = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    return make_prm_batch(tokenizer, problems, completions, width)


def step_loss(
    prm: RewardModel, input_ids: jax.Array, step_mask: jax.Array, labels: jax.Array
) -> jax.Array:
    """Mean cross-entropy of the PRM's two-class head at the labelled step ends.

    Args:
        prm: :class:`RewardModel` with two labels.
        input_ids: ``int32[B, L]``.
        step_mask: ``bool[B, L]`` labelled positions.
        labels: ``int32[B, L]`` 1 = prefix correct.

    Returns:
        Scalar loss.
    """
    n, t = input_ids.shape
    logits, _ = reward_logits(prm, input_ids, init_cache(prm.config, n, t))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = step_mask.astype(jnp.float32)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def prm_config(policy_config: LMConfig) -> LMConfig:
    """The policy's architecture as Qwen2 (``Qwen2ForProcessRewardModel`` has no o_proj bias)."""
    return dataclasses.replace(policy_config, model_type="qwen2", attention_bias=False)


def init_prm(policy: LM, seed: int) -> RewardModel:
    """A PRM whose backbone copies the policy's weights (all but the o_proj biases).

    The score head is fresh; the policy's small o_proj biases are dropped.
    """
    prm = RewardModel(prm_config(policy.config), 2, rngs=nnx.Rngs(seed))
    policy_params = dict(nnx.to_flat_state(nnx.state(policy.model, nnx.Param)))
    flat = [(p, policy_params[p]) for p, _ in nnx.to_flat_state(nnx.state(prm.model, nnx.Param))]
    nnx.update(prm.model, nnx.from_flat_state(flat))
    return prm


def train(cfg: TrainConfig, data: PRMBatch, policy: LM, run_dir: pathlib.Path) -> RewardModel:
    """Runs (or resumes) the optimization and returns the trained PRM."""
    graphdef, params = nnx.split(init_prm(policy, cfg.seed))
    opt = make_optimizer(cfg)
    manager = ocp.CheckpointManager(
        run_dir.resolve() / "orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    start, params, opt_state = restore_or_init(manager, params, opt.init(params))
    width = int(data.attention_mask.sum(1).max())
    ids, mask, labels = (x[:, :width] for x in (data.input_ids, data.step_mask, data.labels))

    @jax.jit
    def step_fn(params, opt_state, ids, mask, labels):
        loss_fn = lambda p: step_loss(nnx.merge(graphdef, p), ids, mask, labels)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tic, losses = time.perf_counter(), []
    for step in range(start, cfg.steps):
        idx = np.random.default_rng([cfg.seed, step]).integers(0, len(ids), cfg.batch_size)
        params, opt_state, loss = step_fn(params, opt_state, ids[idx], mask[idx], labels[idx])
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


def label_stats(data: PRMBatch) -> dict:
    """How many step labels there are and the fraction that are positive."""
    labels = data.labels[data.step_mask]
    return {
        "num_solutions": len(data.input_ids),
        "num_step_labels": int(labels.size),
        "positive_fraction": round(float(labels.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nRun: " + __doc__.split("Run: ")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_args(parser, NAME, f"tts_jax/assets/{NAME}")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--policy",
        type=pathlib.Path,
        default=ARITH_LM_DIR,
        metavar="DIR",
        help="policy folder (weights + tokenizer) to sample from and initialise "
        "the PRM with (default: the asset %(default)s; only read)",
    )
    args = parser.parse_args()
    out = check_out(args.out)
    cfg = TrainConfig(steps=args.steps, seed=args.seed)
    config, policy, tokenizer = load_arith_policy(args.policy)
    run_dir = out / "checkpoints" / f"arith-prm-{cfg.digest(args.policy)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    samples = load_or_sample(cfg, policy, tokenizer, run_dir)
    contrast = contrast_data(cfg, tokenizer, samples.input_ids.shape[1])
    data = PRMBatch(*(np.concatenate(x) for x in zip(samples, contrast, strict=True)))
    print("labels:", label_stats(data))
    prm = train(cfg, data, policy, run_dir)
    save_reward_model(out, prm_config(config), prm)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(prm, nnx.Param)))
    policy_name = (
        "tts_jax/assets/arith-lm"
        if args.policy.resolve() == ARITH_LM_DIR.resolve()
        else str(args.policy)
    )
    write_json(
        out / "training.json",
        {
            "recipe": cfg,
            "task": ARITH_TASK,
            "num_params": num_params,
            "data": label_stats(data),
            "loss": loss_summary(read_jsonl(run_dir / "log.jsonl")),
            "environment": environment(),
            "script": "tts_jax.app.training.arith_prm",
            "policy": policy_name,
        },
    )
    print(f"wrote {out} ({num_params} parameters)")
    if args.install:
        install_asset(out, NAME, EXPORTED)
    else:
        print(f"package assets untouched; rerun with --install to copy into assets/{NAME}")


if __name__ == "__main__":
    main()

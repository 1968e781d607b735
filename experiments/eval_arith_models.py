"""Measure the embedded arithmetic policy and PRM on held-out problems.

On the first ``--problems`` held-out problems
(:func:`tts_jax.app.tasks.arith_models.eval_problems`, never trained on) this measures, with the
exact checker of :mod:`tts_jax.app.tasks.arithmetic`:

- greedy accuracy (one greedy completion per problem);
- sampled single-sample accuracy at temperature 0.8 (mean over all 64 samples of each problem)
  and coverage@k, the fraction of problems with at least one correct answer among k samples
  (unbiased pass@k estimator of Chen et al. 2021, k = 1..64; k = 64 is best-of-64 coverage),
  and majority-vote accuracy over the 64 answers;
- the PRM on the first ``--prm-samples`` samples of each problem: step-level accuracy (threshold
  0.5) and ROC AUC against the checker's prefix labels, the outcome AUC of the score read at the
  EOS (the ORM reading) against final-answer correctness, and the accuracy of picking, per
  problem, the sample with the highest final PRM score (PRM best-of-n).

Writes ``experiments/arith_models_eval.json`` and ``experiments/results_arith_models.md``.

Run: ``python experiments/eval_arith_models.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import time
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.metrics import roc_auc_score

from tts_jax.app.runs import environment, write_json
from tts_jax.app.tasks.arith_data import make_prm_batch
from tts_jax.app.tasks.arith_models import (
    ARITH_TASK,
    eval_problems,
    load_arith_policy,
    load_arith_prm,
    sample_solutions,
)
from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer
from tts_jax.app.tasks.arithmetic import Problem, extract_answer, is_correct
from tts_jax.models.lm import LM
from tts_jax.models.lm_reward import RewardModel, prm_scores

HERE = pathlib.Path(__file__).resolve().parent
TEMPERATURE = 0.8
NUM_SAMPLES = 64
SAMPLE_BATCH = 512
PRM_BATCH = 256
SEED = 0


def sample_many(
    policy: LM,
    tokenizer: ArithTokenizer,
    problems: list[Problem],
    num_samples: int,
    temperature: float,
    key: jax.Array,
) -> np.ndarray:
    """``int32[len(problems), num_samples, T]`` completions, in fixed-size chunks."""
    rows = [p for p in problems for _ in range(num_samples)]
    chunks = []
    for start in range(0, len(rows), SAMPLE_BATCH):
        chunk = rows[start : start + SAMPLE_BATCH]
        padded = chunk + [chunk[-1]] * (SAMPLE_BATCH - len(chunk))  # one compiled shape
        tokens = sample_solutions(
            policy, tokenizer, padded, jax.random.fold_in(key, start), temperature=temperature
        )
        chunks.append(tokens[: len(chunk)])
    return np.concatenate(chunks).reshape(len(problems), num_samples, -1)


def coverage_at_k(num_correct: np.ndarray, n: int, k: int) -> float:
    """Mean over problems of ``1 - C(n - c, k) / C(n, k)`` (unbiased pass@k)."""
    return float(np.mean([1.0 - comb(n - c, k) / comb(n, k) for c in num_correct]))


def majority_vote(answers: list[int | None]) -> int | None:
    """The most frequent extracted answer (ties: first seen), ignoring missing ones."""
    counts = collections.Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


def policy_metrics(problems: list[Problem], greedy: list[str], samples: list[list[str]]) -> dict:
    """Greedy / sampled accuracy, coverage@k and majority vote."""
    correct = np.array(
        [[is_correct(p, t) for t in row] for p, row in zip(problems, samples, strict=True)]
    )
    num_correct = correct.sum(1)
    votes = [majority_vote([extract_answer(t) for t in row]) for row in samples]
    ks = [2**i for i in range(int(np.log2(NUM_SAMPLES)) + 1)]
    return {
        "greedy_accuracy": float(
            np.mean([is_correct(p, t) for p, t in zip(problems, greedy, strict=True)])
        ),
        "sampled_accuracy": float(correct.mean()),
        "coverage_at_k": {k: round(coverage_at_k(num_correct, NUM_SAMPLES, k), 4) for k in ks},
        "best_of_64_coverage": float(np.mean(num_correct > 0)),
        "majority_vote_64_accuracy": float(
            np.mean([v == p.answer for v, p in zip(votes, problems, strict=True)])
        ),
    }


def score_steps(prm: RewardModel, input_ids: np.ndarray, step_mask: np.ndarray) -> np.ndarray:
    """PRM probabilities ``[B, L]`` at the step ends, in fixed-size chunks."""
    score = jax.jit(prm_scores)
    out = []
    for start in range(0, len(input_ids), PRM_BATCH):
        ids, mask = input_ids[start : start + PRM_BATCH], step_mask[start : start + PRM_BATCH]
        pad = PRM_BATCH - len(ids)
        ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
        out.append(np.asarray(score(prm, jnp.asarray(ids), jnp.asarray(mask)))[: PRM_BATCH - pad])
    return np.concatenate(out)


def prm_metrics(
    prm: RewardModel, tokenizer: ArithTokenizer, problems: list[Problem], tokens: np.ndarray
) -> dict:
    """Step-level and outcome quality of the PRM on held-out policy samples ``[P, n, T]``."""
    n = tokens.shape[1]
    rows = [p for p in problems for _ in range(n)]
    flat = tokens.reshape(len(rows), -1)
    batch = make_prm_batch(tokenizer, rows, flat, 2 * flat.shape[1])
    width = int(batch.attention_mask.sum(1).max())
    scores = score_steps(prm, batch.input_ids[:, :width], batch.step_mask[:, :width])
    step_mask, labels = batch.step_mask[:, :width], batch.labels[:, :width]
    step_scores, step_labels = scores[step_mask], labels[step_mask]
    # The last labelled step end of a finished solution is its EOS: the outcome (ORM) reading.
    last = np.array([np.flatnonzero(m)[-1] if m.any() else 0 for m in step_mask])
    final = np.where(step_mask.any(1), scores[np.arange(len(rows)), last], 0.0)
    texts = [tokenizer.decode(t) for t in flat]
    outcome = np.array([is_correct(p, t) for p, t in zip(rows, texts, strict=True)])
    pick = final.reshape(len(problems), n).argmax(1)
    return {
        "num_solutions": len(rows),
        "num_steps": int(step_labels.size),
        "step_positive_fraction": float(step_labels.mean()),
        "step_accuracy": float(np.mean((step_scores > 0.5) == (step_labels == 1))),
        "step_auc": float(roc_auc_score(step_labels, step_scores)),
        "outcome_auc": float(roc_auc_score(outcome, final)),
        f"prm_best_of_{n}_accuracy": float(
            outcome.reshape(len(problems), n)[np.arange(len(problems)), pick].mean()
        ),
        f"coverage_at_{n}": float(outcome.reshape(len(problems), n).any(1).mean()),
    }


def num_params(module: nnx.Module) -> int:
    """Number of scalar parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def markdown(report: dict) -> str:
    """The RESULTS.md section."""
    pol, prm = report["policy"], report["prm"]
    n = report["prm_samples_per_problem"]
    cov = " | ".join(f"{k}: {v:.2f}" for k, v in pol["coverage_at_k"].items())
    return "\n".join(
        [
            "## Embedded arithmetic policy and PRM",
            "",
            f"Held-out problems: {report['num_problems']} "
            f"(`eval_problems`, task `{report['task']}`). "
            f"Policy `assets/arith-lm` ({report['policy_params']:,} parameters), PRM "
            f"`assets/arith-prm` ({report['prm_params']:,}). Checker: "
            "`tts_jax.app.tasks.arithmetic`. Produced by `experiments/eval_arith_models.py` "
            f"in {report['seconds']:.0f} s.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| greedy accuracy | {pol['greedy_accuracy']:.3f} |",
            f"| single-sample accuracy (T={TEMPERATURE}, mean of {NUM_SAMPLES}) | "
            f"{pol['sampled_accuracy']:.3f} |",
            f"| best-of-{NUM_SAMPLES} coverage (>= 1 correct) | {pol['best_of_64_coverage']:.3f} |",
            f"| majority vote over {NUM_SAMPLES} | {pol['majority_vote_64_accuracy']:.3f} |",
            f"| PRM step accuracy (threshold 0.5) | {prm['step_accuracy']:.3f} |",
            f"| PRM step ROC AUC | {prm['step_auc']:.3f} |",
            f"| ORM (PRM at EOS) outcome ROC AUC | {prm['outcome_auc']:.3f} |",
            f"| PRM best-of-{n} accuracy (vs coverage@{n} {prm[f'coverage_at_{n}']:.3f}) | "
            f"{prm[f'prm_best_of_{n}_accuracy']:.3f} |",
            "",
            f"Coverage@k (T={TEMPERATURE}): {cov}.",
            "",
            f"PRM metrics use the first {n} samples of each problem ({prm['num_solutions']} "
            f"solutions, {prm['num_steps']} labelled step ends, "
            f"{prm['step_positive_fraction']:.0%} positive).",
            "",
            *selection_note(pol["sampled_accuracy"], prm[f"prm_best_of_{n}_accuracy"], n),
        ]
    )


def selection_note(single: float, prm_best: float, n: int) -> list[str]:
    """A warning when PRM selection is worse than taking one random sample."""
    if prm_best >= single:
        return []
    return [
        f"Caveat: PRM best-of-{n} ({prm_best:.3f}) is below a single random sample "
        f"({single:.3f}). The AUCs come mostly from telling easy problems from hard ones; "
        "within one problem the PRM barely separates correct from wrong samples, so it is "
        "not yet a useful verifier for search.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--prm-samples", type=int, default=16)
    args = parser.parse_args()
    tic = time.perf_counter()
    problems = eval_problems(args.problems)
    _, policy, tokenizer = load_arith_policy()
    _, prm = load_arith_prm()
    key = jax.random.key(SEED)
    greedy = sample_many(policy, tokenizer, problems, 1, 0.0, jax.random.fold_in(key, 0))
    samples = sample_many(
        policy, tokenizer, problems, NUM_SAMPLES, TEMPERATURE, jax.random.fold_in(key, 1)
    )
    print(f"sampled in {time.perf_counter() - tic:.0f} s", flush=True)
    texts = [[tokenizer.decode(t) for t in row] for row in samples]
    report = {
        "num_problems": len(problems),
        "task": repr(ARITH_TASK),
        "temperature": TEMPERATURE,
        "num_samples": NUM_SAMPLES,
        "prm_samples_per_problem": args.prm_samples,
        "seed": SEED,
        "policy_params": num_params(policy),
        "prm_params": num_params(prm),
        "policy": policy_metrics(problems, [tokenizer.decode(t[0]) for t in greedy], texts),
        "prm": prm_metrics(prm, tokenizer, problems, samples[:, : args.prm_samples]),
        "environment": environment(),
    }
    report["seconds"] = round(time.perf_counter() - tic, 1)
    write_json(HERE / "arith_models_eval.json", report)
    (HERE / "results_arith_models.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

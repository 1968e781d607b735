"""Steer the unconditional digits flow model toward each class (issue: image models, RESULTS).

The steering reward is the verifier classifier's ``log p(class | x)`` (lambda = 1 targets
``p(x | class)``); the held-out classifier (another architecture, other data) measures whether the
selected sample really is that digit. For each method and NFE budget, every class and seed is run
once; a record per run is appended to ``class-<c>/runs.jsonl`` (resumable), then the script writes
``experiments/results_digits.md`` and a scaling plot.

Run: ``python experiments/digits_steering.py [--quick]`` (CPU, ~10 minutes; --quick: smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from collections import defaultdict

import numpy as np

from tts_jax.app import experiment, plots
from tts_jax.app.data.digits import load_digits
from tts_jax.rewards.classifier import load_digits_heldout
from tts_jax.rewards.metrics import classifier_features, frechet_distance

HERE = pathlib.Path(__file__).resolve().parent
METHODS = ["single", "bon", "zo", "fk", "svdd", "rbf"]


def frechet_by_run_group(records: list[dict], classifier) -> dict[tuple[str, int], float]:
    """Fréchet distance (held-out classifier features) between the selected samples of all classes
    and seeds of a (method, budget) and class-matched real digits."""
    digits = load_digits()
    real_by_class = {c: digits.images[digits.labels == c] for c in range(10)}
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["budget"])].append(r)
    out = {}
    for key, rows in groups.items():
        samples = np.stack(
            [np.asarray(r["best_sample"], np.float32).reshape(1, 8, 8) for r in rows]
        )
        real = np.concatenate([real_by_class[r["target_class"]] for r in rows])
        out[key] = frechet_distance(
            classifier_features(classifier, samples), classifier_features(classifier, real)
        )
    return out


def hacking_note(by: dict) -> str:
    """How far the verifier's and the held-out classifier's log-probabilities drift apart."""
    parts = []
    for method in METHODS[1:]:
        budgets = sorted(b for m, b in by if m == method)
        if len(budgets) < 2:
            continue
        lo, hi = by[(method, budgets[0])], by[(method, budgets[-1])]
        gain_v = np.mean([r["best_reward"] for r in hi]) - np.mean([r["best_reward"] for r in lo])
        gain_h = np.mean([r["heldout_log_prob_best"] for r in hi]) - np.mean(
            [r["heldout_log_prob_best"] for r in lo]
        )
        parts.append(f"{method} {gain_v:+.2f} verifier vs {gain_h:+.2f} held-out")
    return (
        f"Gain in log p from the smallest to the largest budget: {'; '.join(parts)}. "
        "Where the verifier gains more than the held-out classifier, search is partly "
        "exploiting the verifier (verifier hacking)."
    )


def write_report(records: list[dict], path: pathlib.Path, figure: str, wall: float) -> None:
    heldout = load_digits_heldout()
    fd = frechet_by_run_group(records, heldout)
    by = defaultdict(list)
    for r in records:
        by[(r["method"], r["budget"])].append(r)
    lines = [
        "## Steering the unconditional digits model toward a class",
        "",
        "Reward: verifier CNN `log p(class | x)`; evaluation: held-out MLP classifier (other",
        "architecture, other half of the data). Each cell averages all 10 target classes x seeds.",
        "Produced by `python experiments/digits_steering.py` on CPU (2 cores): "
        f"{sum(r['wall_time_s'] for r in records) / 60:.1f} min of sampler time (with compiles) "
        f"over {len(records)} runs; this invocation took {wall / 60:.1f} min (runs resume).",
        "",
        "| method | NFE budget | runs | verifier log p (steered) | held-out accuracy | "
        "held-out log p | Fréchet distance (held-out features) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, budget), rows in sorted(
        by.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])
    ):
        v = np.array([r["best_reward"] for r in rows])
        acc = np.array([r["heldout_correct_best"] for r in rows])
        hl = np.array([r["heldout_log_prob_best"] for r in rows])
        se = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
        lines.append(
            f"| {method} | {budget} | {len(rows)} | {v.mean():.3f} | {acc.mean():.3f} ± {se:.3f} | "
            f"{hl.mean():.3f} | {fd[(method, budget)]:.1f} |"
        )
    lines += ["", f"![digits scaling]({figure})", "", hacking_note(by), ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 classes, 1 seed, 2 budgets")
    parser.add_argument("--out", default=str(HERE / "runs" / "digits"))
    args = parser.parse_args()
    classes = [3, 8] if args.quick else list(range(10))
    seeds = [0] if args.quick else [0, 1, 2]
    budgets = [100, 400] if args.quick else [100, 200, 400, 800, 1600]
    base = experiment.RunConfig(
        model="digits", method="bon", num_steps=20, lam=1.0, out_dir=args.out
    )
    start = time.perf_counter()
    records = []
    for c in classes:  # one sweep folder per target class: a folder holds one configuration
        records += experiment.sweep(
            dataclasses.replace(base, target_class=c),
            METHODS,
            budgets,
            seeds,
            str(pathlib.Path(args.out) / f"class-{c}"),
        )
    wall = time.perf_counter() - start
    figure = HERE / "figures" / "digits_scaling"
    plots.scaling_plot(
        records, ["best_reward", "heldout_correct_best", "heldout_log_prob_best"], str(figure)
    )
    write_report(records, HERE / "results_digits.md", "figures/digits_scaling.png", wall)
    print((HERE / "results_digits.md").read_text())


if __name__ == "__main__":
    main()

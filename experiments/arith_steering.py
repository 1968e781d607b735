"""Accuracy versus particle budget N on held-out arithmetic problems (Puri et al. 2025, Fig. 1).

For every method of :data:`tts_jax.app.experiment_lm.LM_METHODS` chosen here (greedy, majority vote,
best-of-N, weighted best-of-N, beam search, particle filtering, entropic PF), every budget N and
every scorer (the learned PRM and the exact checker as an oracle PRM), each of the first
``--problems`` held-out problems is solved once; one record per run is appended to
``runs.jsonl`` (resumable; one folder per policy/PRM checkpoint). The script then writes
``experiments/results_arith.md`` (accuracy ± standard error over problems) and
``experiments/figures/arith_scaling.png``. Without a PRM checkpoint only the oracle is run.

Run: ``python experiments/arith_steering.py [--quick]`` (CPU, ~12 minutes; --quick: ~1 minute).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib

import numpy as np

from tts_jax.app import experiment_lm, plots, runs
from tts_jax.app.tasks.arith_models import ARITH_LM_DIR, ARITH_PRM_DIR

HERE = pathlib.Path(__file__).resolve().parent
METHODS = ["greedy", "majority", "bon", "wbon", "beam", "pf", "epf"]
BASELINES = ["greedy", "majority", "bon", "wbon", "beam"]
BUDGETS = [1, 2, 4, 8, 16, 32]
REACH = 0.95  # accuracy level whose first budget the report names


def fingerprint(folder: pathlib.Path) -> str:
    """First 10 hex digits of the SHA-256 of a checkpoint's weights ("none" if absent)."""
    weights = folder / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:10] if weights.is_file() else "none"


def by_scorer(records: list[dict], scorer: str, budgets: list[int]) -> list[dict]:
    """The records a scorer's table shows: its own runs plus the scorer-free methods; greedy
    (recorded once, budget 1) is repeated at every budget as a flat reference."""
    out = []
    for r in records:
        if r["scorer"] not in (scorer, "none"):
            continue
        if r["method"] == "greedy":
            out += [r | {"budget": b} for b in budgets]
        else:
            out.append(r)
    return out


def accuracy(records: list[dict], method: str, budget: int) -> tuple[float, float, int]:
    """Mean accuracy, its standard error over problems, and the number of runs."""
    v = np.asarray(
        [float(r["correct"]) for r in records if r["method"] == method and r["budget"] == budget]
    )
    if v.size == 0:
        return np.nan, np.nan, 0
    se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    return float(v.mean()), float(se), int(v.size)


def accuracy_table(records: list[dict], methods: list[str], budgets: list[int]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"N={b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in methods:
        cells = []
        for b in budgets:
            mean, se, n = accuracy(records, m, b)
            cells.append(f"{mean:.3f} ± {se:.3f}" if n else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def cost_table(records: list[dict], methods: list[str], budget: int) -> list[str]:
    lines = [
        f"| method (N={budget}) | tokens | LM calls | PRM calls | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        rows = [r for r in records if r["method"] == m and r["budget"] == budget]
        if rows:
            s = experiment_lm.summarize(rows)
            lines.append(
                f"| {m} | {s['tokens']:.0f} | {s['lm_calls']:.0f} | "
                f"{s['prm_calls']:.0f} | {s['wall_time_s']:.2f} |"
            )
    return lines


def pf_verdict(records: list[dict], budgets: list[int]) -> str:
    """Where PF is at/above the best baseline (within one standard error) and how fast it rises."""
    at_or_above, below = [], []
    for b in budgets:
        pf, se, _ = accuracy(records, "pf", b)
        best = max(BASELINES, key=lambda m: np.nan_to_num(accuracy(records, m, b)[0], nan=-1))
        base = accuracy(records, best, b)[0]
        cell = f"N={b} (pf {pf:.2f}, {best} {base:.2f})"
        (at_or_above if pf + se >= base else below).append(cell)
    steered = [b for b in budgets if b > 1] or budgets
    rises = {
        m: np.mean([accuracy(records, m, b)[0] for b in steered])
        for m in ["pf", "epf", *BASELINES[1:]]
    }
    order = sorted(rises, key=lambda m: -np.nan_to_num(rises[m], nan=-1))
    first = {
        m: next((b for b in budgets if accuracy(records, m, b)[0] >= REACH), None) for m in order
    }
    return (
        f"PF is at or above the best baseline (within one s.e.) at {len(at_or_above)} of "
        f"{len(budgets)} budgets: {'; '.join(at_or_above) or 'none'}. Below it at: "
        f"{'; '.join(below) or 'none'}. Mean accuracy over N = {steered[0]}..{steered[-1]} "
        f"(higher = the curve rises earlier): "
        + ", ".join(f"{m} {rises[m]:.3f}" for m in order)
        + f". Smallest N reaching {REACH:.2f}: "
        + ", ".join(f"{m} {first[m] or '-'}" for m in order)
        + "."
    )


def write_report(
    records: list[dict],
    scorers: list[str],
    budgets: list[int],
    problems: int,
    checkpoints: dict[str, str],
    path: pathlib.Path,
) -> None:
    wall = sum(r["wall_time_s"] for r in records)
    lines = [
        "## LM steering on held-out arithmetic: accuracy versus particle budget N",
        "",
        f"{problems} held-out problems (`eval_problems`, seed 1, 2-5 operations), one seed; "
        "sampling temperature 0.8, T_softmax = 1, steps = lines, at most 8 steps. Accuracy of the "
        "selected answer (exact checker), ± standard error over problems. Greedy does not depend "
        "on N (one run, repeated in every column). Checkpoints (SHA-256 prefix of the weights): "
        + ", ".join(f"{k} `{v}`" for k, v in checkpoints.items())
        + ".",
        f"Produced by `python experiments/arith_steering.py`; the runs took {wall / 60:.1f} min "
        "on a shared 2-core CPU (sum of per-run wall times, compilation included).",
        "",
    ]
    if "prm" not in scorers:
        lines += [
            "**No PRM checkpoint was available** (`tts_jax/assets/arith-prm` missing): only "
            "the oracle scorer was run. Re-run the script once the PRM is trained.",
            "",
        ]
    for scorer in scorers:
        rows = by_scorer(records, scorer, budgets)
        title = {"prm": "learned PRM", "oracle": "oracle PRM (exact checker, 0.99 / 0.01)"}[scorer]
        lines += [
            f"### Scorer: {title}",
            "",
            *accuracy_table(rows, METHODS, budgets),
            "",
            *cost_table(rows, METHODS[1:], budgets[-1]),
            "",
            f"**PF versus the baselines ({scorer}).** {pf_verdict(rows, budgets)}",
            "",
        ]
    lines += [
        "Caveats: one seed and a few dozen problems, so differences smaller than about two "
        "standard errors are noise. With the oracle scorer, best-of-N and weighted best-of-N pick "
        "a fully correct sample whenever one exists (they measure coverage), so the oracle tables "
        "bound what a perfect verifier can extract from N samples; PF's advantage must come from "
        "steering the policy to correct prefixes it rarely completes on its own. Majority vote "
        "and greedy use no scorer and are the same in both tables. With a learned PRM, more "
        "particles are more chances to select a wrong solution the PRM over-rates (compare bon "
        "with the oracle's bon, which is coverage): a PRM whose outcome ranking is weak can make "
        "PRM-guided curves fall with N, and PF cannot do better than the scorer it follows. Check "
        "with the PRM best-of-16 accuracy of `experiments/results_arith_models.md`.",
        "",
        "![arith scaling](figures/arith_scaling.png)",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot_records(records: list[dict], scorers: list[str], budgets: list[int]) -> list[dict]:
    """Records with one ``correct_<scorer>`` metric per scorer panel."""
    out = []
    for scorer in scorers:
        out += [
            {"method": r["method"], "budget": r["budget"], f"correct_{scorer}": r["correct"]}
            for r in by_scorer(records, scorer, budgets)
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 problems, N in {1, 4}; report and plot go to the runs folder",
    )
    parser.add_argument("--problems", type=int, default=40, help="held-out problems")
    parser.add_argument("--budgets", type=int, nargs="+", default=BUDGETS)
    parser.add_argument("--scorers", nargs="+", default=list(experiment_lm.SCORERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "runs" / "arith"))
    args = parser.parse_args()
    problems, budgets = (4, [1, 4]) if args.quick else (args.problems, sorted(args.budgets))
    checkpoints = {"policy": fingerprint(ARITH_LM_DIR), "prm": fingerprint(ARITH_PRM_DIR)}
    scorers = [s for s in args.scorers if s != "prm" or checkpoints["prm"] != "none"]
    if scorers != args.scorers:
        print("no PRM checkpoint in tts_jax/assets/arith-prm: running the oracle scorer only")
    out = pathlib.Path(args.out) / f"lm-{checkpoints['policy']}"
    bundle = experiment_lm.load_lm_bundle(with_prm="prm" in scorers)
    records = []
    for scorer in scorers:  # PRM runs are redone whenever the PRM changes, oracle runs are not
        folder = out / (f"prm-{checkpoints['prm']}" if scorer == "prm" else scorer)
        base = experiment_lm.LMRunConfig(scorer=scorer)
        records += experiment_lm.sweep_lm(
            METHODS, budgets, [args.seed], range(problems), folder, base=base, bundle=bundle
        )
    records = list(
        {(r["method"], r["budget"], r["problem"], r["scorer"]): r for r in records}.values()
    )
    runs.write_json(
        out / "environment.json", {"checkpoints": checkpoints, "environment": runs.environment()}
    )
    report = out / "results_arith_quick.md" if args.quick else HERE / "results_arith.md"
    figure = out / "arith_scaling_quick" if args.quick else HERE / "figures" / "arith_scaling"
    plots.scaling_plot(
        plot_records(records, scorers, budgets),
        [f"correct_{s}" for s in scorers],
        str(figure),
        xlabel="N (samples / particles / beams)",
    )
    write_report(records, scorers, budgets, problems, checkpoints, report)
    print(report.read_text())


if __name__ == "__main__":
    main()

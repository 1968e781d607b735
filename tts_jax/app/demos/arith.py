"""Arithmetic demo: particle filtering versus best-of-N on the embedded LM, learned PRM vs oracle.

Greedy decoding, best-of-N and particle filtering with the learned PRM, and best-of-N and particle
filtering with the exact checker as the verifier, all at ``N`` particles on the same held-out
problems. Writes ``config.json``, ``result.json``, ``samples.npz`` (per method and problem: the
selected completion and its verdict) and ``diagnostics.npz`` (per method: tokens, PRM calls and the
particle filters' per-step ESS).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from tts_jax.app import experiment_lm, runs

ROWS = (("greedy", "prm"), ("bon", "prm"), ("pf", "prm"), ("bon", "oracle"), ("pf", "oracle"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithDemoConfig:
    """Configuration of the arithmetic demo."""

    num_particles: int = 8
    """N for best-of-N and particle filtering"""
    problems: tuple[int, int] = (0, 10)
    """held-out problem range START STOP"""
    seed: int = 0
    """PRNG seed"""
    out_dir: str = "outputs/arith-demo"
    """output folder"""


def row_name(method: str, scorer: str) -> str:
    """``greedy``, ``bon-prm``, ``pf-oracle``, ..."""
    return method if method == "greedy" else f"{method}-{scorer}"


def run_arith_demo(config: ArithDemoConfig = ArithDemoConfig()) -> dict:
    """Run every row; returns per-row summaries (also in ``result.json``) and the files written."""
    bundle = experiment_lm.load_lm_bundle()
    rows, samples, per_step = {}, {}, {}
    for method, scorer in ROWS:
        run = experiment_lm.LMRunConfig(
            method=method,
            num_particles=config.num_particles,
            problems=config.problems,
            seed=config.seed,
            scorer=scorer,
        )
        summary = experiment_lm.run_lm(run, bundle)
        records = summary.pop("records")
        name = row_name(method, scorer)
        rows[name] = summary
        samples[f"{name}/completion"] = np.asarray([r["completion"] for r in records], np.str_)
        samples[f"{name}/correct"] = np.asarray([r["correct"] for r in records], bool)
        per_step[f"{name}/tokens"] = np.asarray([r["tokens"] for r in records], np.int64)
        per_step[f"{name}/prm_calls"] = np.asarray([r["prm_calls"] for r in records], np.int64)
        if all("step_ess" in r for r in records):
            per_step[f"{name}/ess"] = np.asarray([r["step_ess"] for r in records])
    out = pathlib.Path(config.out_dir)
    files = ["config.json", "result.json", "samples.npz", "diagnostics.npz"]
    result = {"num_particles": config.num_particles, "rows": rows, "files": files}
    runs.write_json(out / "config.json", {"config": config, "environment": runs.environment()})
    runs.write_json(out / "result.json", result)
    np.savez(out / "samples.npz", problem=np.arange(*config.problems), **samples)
    np.savez(out / "diagnostics.npz", **per_step)
    return result


def format_table(result: dict) -> str:
    """Accuracy and costs per row as a small text table."""
    lines = [f"{'method':<10}{'scorer':<8}{'accuracy':>10}{'tokens':>9}{'PRM calls':>11}"]
    for method, scorer in ROWS:
        s = result["rows"][row_name(method, scorer)]
        shown = "-" if method == "greedy" else scorer
        lines.append(
            f"{method:<10}{shown:<8}{s['correct']:>10.2f}{s['tokens']:>9.0f}{s['prm_calls']:>11.1f}"
        )
    return "\n".join(lines)

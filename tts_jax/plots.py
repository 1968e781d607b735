"""Scaling plots: a metric versus NFE budget, one line per method, 95% bands over seeds."""

from __future__ import annotations

import pathlib
from collections import defaultdict
from typing import Any

import numpy as np


def aggregate(records: list[dict[str, Any]], metric: str) -> dict[str, np.ndarray]:
    """Per method: rows ``(budget, mean, half-width of the 95% band, seeds)`` sorted by budget."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if metric in r:
            groups[(r["method"], r["budget"])].append(float(r[metric]))
    out: dict[str, list] = defaultdict(list)
    for (method, budget), values in sorted(groups.items()):
        v = np.asarray(values)
        half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        out[method].append((budget, v.mean(), half, len(v)))
    return {m: np.asarray(rows) for m, rows in out.items()}


def scaling_plot(
    records: list[dict[str, Any]], metrics: list[str], path_prefix: str, xlabel: str = "NFE budget"
) -> list[str]:
    """Draw one panel per metric and save ``path_prefix.png`` and ``.svg``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method, rows in aggregate(records, metric).items():
            ax.plot(rows[:, 0], rows[:, 1], marker="o", label=method)
            ax.fill_between(rows[:, 0], rows[:, 1] - rows[:, 2], rows[:, 1] + rows[:, 2], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    prefix = pathlib.Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [str(prefix.with_suffix(ext)) for ext in (".png", ".svg")]
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths


def markdown_table(records: list[dict[str, Any]], metric: str) -> str:
    """``metric`` mean ± 95% half-width per method (rows) and budget (columns)."""
    agg = aggregate(records, metric)
    budgets = sorted({int(b) for rows in agg.values() for b in rows[:, 0]})
    lines = [
        "| method | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method, rows in agg.items():
        cells = {int(b): f"{m:.3f} ± {h:.3f}" for b, m, h, _ in rows}
        lines.append(f"| {method} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
    return "\n".join(lines)

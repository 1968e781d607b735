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


def image_grid(images: np.ndarray, scores: np.ndarray, path, max_images: int = 16) -> None:
    """Save up to ``max_images`` of ``images [N, C, H, W]`` (in [-1, 1]; ``C`` 1: grey, 3: RGB),
    best score first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:max_images]
    cols = min(len(order), 8)
    rows = -(-len(order) // cols)
    panel = 1.2 if images.shape[1] == 1 else 2.4  # RGB images (text-to-image) drawn larger
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel * cols, (panel + 0.1) * rows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order, strict=False):
        img = np.transpose(images[i], (1, 2, 0))
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray_r", vmin=-1, vmax=1)
        else:
            ax.imshow(np.clip((img + 1) / 2, 0, 1))
        ax.set_title(f"{scores[i]:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

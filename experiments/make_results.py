"""Assemble ``experiments/RESULTS.md`` from the sections the experiment scripts write.

Each script regenerates its own section (``results_*.md``); this script only concatenates them in a
fixed order, so RESULTS.md always reflects the latest run of every experiment.
Run: ``python experiments/make_results.py``.
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
ASSETS = HERE.parent / "tts_jax" / "assets"
SECTIONS = [
    ("results_digits.md", "python experiments/digits_steering.py"),
    ("results_arith_models.md", "python experiments/eval_arith_models.py"),
    ("results_arith.md", "python experiments/arith_steering.py"),
]


def digits_models_section() -> str:
    """The embedded image models' quality, from their metrics files."""
    lines = ["## Embedded image models", "", "| model | measure | value |", "|---|---|---|"]
    for name in ("digits-verifier", "digits-heldout"):
        path = ASSETS / name / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            lines.append(
                f"| {name} ({m['num_params']} params) | accuracy on digits never "
                f"trained on ({m['num_heldout']}) | {m['heldout_accuracy']:.4f} |"
            )
    path = HERE / "digits_flow_eval.json"
    if path.exists():
        e = json.loads(path.read_text())
        for setting, v in e["conditional"].items():
            lines.append(
                f"| digits-dit | held-out classifier accuracy of class-conditional "
                f"samples, {setting} | {v['accuracy']:.3f} |"
            )
        fd = e["frechet_distance_heldout_features"]
        lines.append(
            f"| digits-dit | Fréchet distance, unconditional samples vs real "
            f"(real-vs-real floor {fd['real_part_b_floor']:.2f}) | "
            f"{fd['unconditional_samples']:.2f} |"
        )
        lines.append(f"| digits-dit | sampler | {e['sampler']} |")
    lines += [
        "",
        "![digits samples](figures/digits_samples.png)",
        "_Written by `python experiments/eval_digits_flow.py` and the training scripts._",
    ]
    return "\n".join(lines)


def main() -> None:
    parts = [
        "# Results",
        "",
        "Every table below is written by the script named above it, on CPU, from the embedded",
        "models; re-run the script to regenerate its section, then this file with",
        "`python experiments/make_results.py`.",
        "",
        digits_models_section(),
        "",
    ]
    for name, command in SECTIONS:
        path = HERE / name
        if path.exists():
            parts += [f"<!-- {command} -->", path.read_text().strip(), ""]
        else:
            parts += [f"_{name} has not been generated yet: run `{command}`._", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()

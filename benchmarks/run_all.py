"""Run every benchmark in one go and write ``benchmarks/RESULTS.md``.

Each benchmark prints its own markdown table of ratios measured side by side in one process
(median of repetitions after warm-up, compile time apart). This script runs them one after the
other in fresh processes, so they do not share caches or threads, records the machine and
package versions, and rewrites RESULTS.md after each one: an interrupted run keeps the sections
that finished and the earlier measurement of the others, each dated.
Run: ``python -m benchmarks.run_all`` (or ``make bench``); ``--only MODULE ...`` re-runs some
sections and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import subprocess
import sys

from tts_jax.app import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = [
    ("Image sampler overhead (digits DiT, exact GMM)", "benchmarks.sampler_overhead"),
    ("FK steering overhead (GMM)", "benchmarks.fk_overhead"),
    ("Why FK steering exceeds bare forwards at small N (profile)", "benchmarks.overhead_profile"),
    ("DiT denoising loop: tts-jax vs diffusers PyTorch", "benchmarks.dit_denoise"),
    ("LM decoding: tts-jax vs transformers generate", "benchmarks.lm_decode"),
    ("LM steering overhead (PF, token SMC vs batched decode)", "benchmarks.lm_steering_overhead"),
    ("Scaling in particles and steps, compiled memory, KV-cache size", "benchmarks.scaling"),
    ("Sharded particles over 8 host devices (FK, token SMC)", "benchmarks.sharded"),
    ("Compile time per sampler; hyper-parameter sweeps compile once", "benchmarks.compile_time"),
    (
        "Text-to-image pipelines: tts-jax vs diffusers; FK and best-of-N overhead",
        "benchmarks.t2i_pipeline",
    ),
    ("CLIP-family reward throughput and its share of an FK step", "benchmarks.t2i_rewards"),
]


RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def read_sections(path: pathlib.Path) -> dict[str, str]:
    """``title -> body`` of the ``## title`` sections of an existing RESULTS.md."""
    if not path.exists():
        return {}
    sections, title = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
            sections[title] = []
        elif title is not None:
            sections[title].append(line)
    return {t: "\n".join(body).strip() for t, body in sections.items()}


def write_results(sections: dict[str, str]) -> None:
    """Header (machine, versions) and the sections in :data:`BENCHMARKS` order."""
    env = runs.environment()
    lines = [
        "# Benchmarks",
        "",
        f"{os.cpu_count()} CPU cores ({env['platform']}), backend {env['backend']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}.",
        "All figures are ratios measured side by side in one process; absolute times depend on "
        "the machine and its load.",
        "",
    ]
    for title, _ in BENCHMARKS:
        if title in sections:
            lines += [f"## {title}", "", sections[title], ""]
    RESULTS.write_text("\n".join(lines) + "\n")


def run_benchmark(module: str) -> str:
    """Run one benchmark in a fresh process; its stdout (or the error) and when it ran."""
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    body = (
        proc.stdout.strip() if proc.returncode == 0 else f"FAILED:\n```\n{proc.stderr[-2000:]}\n```"
    )
    when = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    return f"`python -m {module}` (measured {when})\n\n{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODULE",
        help="re-run these modules (e.g. benchmarks.sharded) and keep the other sections",
    )
    args = parser.parse_args()
    known = [module for _, module in BENCHMARKS]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown benchmark modules {unknown}; known: {known}")
    sections = read_sections(RESULTS)  # each section says when it was measured
    for title, module in BENCHMARKS:
        if args.only and module not in args.only:
            continue
        print(f"== {title}", flush=True)
        sections[title] = run_benchmark(module)
        print(sections[title], flush=True)
        write_results(sections)  # after every benchmark: an interrupted run keeps what finished


if __name__ == "__main__":
    main()

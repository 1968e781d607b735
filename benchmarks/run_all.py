"""Run every benchmark in one go and write ``benchmarks/RESULTS.md``.

Each benchmark prints its own markdown table of ratios measured side by side in one process
(median of repetitions after warm-up, compile time apart). This script runs them one after the
other in fresh processes, so they do not share caches or threads, and records the machine and
package versions. Run: ``python -m benchmarks.run_all`` (or ``make bench``).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys

from tts_jax import runs

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
]


def main() -> None:
    env = runs.environment()
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{os.cpu_count()} CPU cores ({env['platform']}), backend {env['backend']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}.",
        "All figures are ratios measured side by side in one process; absolute times depend on "
        "the machine and its load.",
        "",
    ]
    for title, module in BENCHMARKS:
        print(f"== {title}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=1800
        )
        body = (
            proc.stdout.strip()
            if proc.returncode == 0
            else f"FAILED:\n```\n{proc.stderr[-2000:]}\n```"
        )
        print(body, flush=True)
        lines += [f"## {title}", "", f"`python -m {module}`", "", body, ""]
    (ROOT / "benchmarks" / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

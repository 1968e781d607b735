"""The ``tts-jax`` command line: ``demo`` runs the main job on the embedded default."""

from __future__ import annotations

import dataclasses
import logging
import sys

import tyro

from tts_jax.demos.gmm import GMMDemoConfig, format_table, run_gmm_demo

log = logging.getLogger("tts_jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Demo:
    """Run the main demo: steer the exact GMM and compare with the closed-form target."""

    gmm: GMMDemoConfig = GMMDemoConfig()


def _demo(cmd: Demo) -> None:
    result = run_gmm_demo(cmd.gmm)
    print("FK steering of a Gaussian mixture toward r(x) = a.x (target p(x) exp(lam r) / Z)")
    print(format_table(result))
    print(
        f"NFE {result['nfe']}, reward calls {result['reward_calls']}, "
        f"resampling events {result['resampling_events']}, wall {result['wall_time_s']:.1f} s"
    )
    print(f"wrote {cmd.gmm.out_dir}/result.json, config.json, samples.npz, gmm_steering.png")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tts-jax`` script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cmd = tyro.extras.subcommand_cli_from_dict({"demo": Demo}, args=argv, prog="tts-jax")
    if isinstance(cmd, Demo):
        _demo(cmd)
    else:  # pragma: no cover - tyro only returns the registered subcommands
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()

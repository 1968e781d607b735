"""The output interface every training module shares: ``--out`` and ``--install``.

A training run writes the trained model (in the folder layout of its asset), its training record
and its checkpoints into ``--out`` (default ``outputs/train/<model name>`` under the current
directory). The git-tracked assets in ``tts_jax/assets/`` are only written by ``--install``, which
copies the exported files there after training and prints what it replaced.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import pathlib
import shutil
from collections.abc import Iterable

from tts_jax.models.zoo import ASSETS_DIR

# Located without importing the package (no JAX import just to name a folder).
ASSETS_ROOT = ASSETS_DIR  # the asset registry's folder (tts_jax.models.zoo)
"""The package's asset folder, ``tts_jax/assets``."""


def default_out(name: str) -> pathlib.Path:
    """``outputs/train/<name>``, relative to the current working directory."""
    return pathlib.Path("outputs") / "train" / name


def add_output_args(parser: argparse.ArgumentParser, name: str, installs: str) -> None:
    """Adds ``--out`` (default :func:`default_out`) and ``--install`` to a script's parser.

    Args:
        parser: the script's parser.
        name: model name (``tts-jax train <name>``), which names the default output folder.
        installs: what ``--install`` replaces, for the help text (e.g. ``"tts_jax/assets/x"``).
    """
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=default_out(name),
        metavar="DIR",
        help="folder for the trained model (same layout as its asset), its training record and "
        "any resumable checkpoints (default: %(default)s, relative to the current directory)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help=f"after training, copy the exported files into {installs} (printing what is "
        "replaced); without it the package's assets are never written",
    )


def check_out(out: pathlib.Path, assets_root: str | os.PathLike | None = None) -> pathlib.Path:
    """``out``, refused if it lies inside the assets (those are written only by ``--install``).

    Args:
        out: the ``--out`` folder.
        assets_root: the asset folder; default :data:`ASSETS_ROOT`.

    Raises:
        SystemExit: ``out`` is inside ``assets_root``.
    """
    assets_root = pathlib.Path(ASSETS_ROOT if assets_root is None else assets_root)
    if out.resolve().is_relative_to(assets_root.resolve()):
        raise SystemExit(
            f"--out {out} is inside the package assets {assets_root}; train into another folder "
            "and pass --install to copy the result there"
        )
    return out


def install_asset(
    src_dir: str | os.PathLike,
    name: str,
    files: Iterable[str] | None = None,
    *,
    assets_root: str | os.PathLike | None = None,
) -> list[pathlib.Path]:
    """Copies exported files from ``src_dir`` into ``assets_root/name``, printing each change.

    Files of the asset folder that are not among ``files`` are left alone (so the tokenizer can be
    installed beside the policy's weights). Each file is written to a temporary name and then
    renamed over the old one, so an interrupted install never leaves a truncated file.

    Args:
        src_dir: folder with the exported files (the training script's ``--out``).
        name: asset folder name, e.g. ``"arith-lm"``.
        files: file names relative to ``src_dir``; default every regular file directly in it.
        assets_root: the asset folder; default :data:`ASSETS_ROOT` (``tts_jax/assets``), looked
            up at call time (tests point it elsewhere).

    Returns:
        The paths written in ``assets_root/name``.

    Raises:
        FileNotFoundError: one of ``files`` is missing (nothing is copied then).
        ValueError: ``src_dir`` is the destination itself.
    """
    src_dir = pathlib.Path(src_dir)
    dest_dir = pathlib.Path(ASSETS_ROOT if assets_root is None else assets_root) / name
    if files is None:
        files = sorted(p.name for p in src_dir.iterdir() if p.is_file())
    files = list(files)
    missing = [f for f in files if not (src_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot install {name}: {src_dir} lacks {missing}")
    if dest_dir.exists() and src_dir.resolve() == dest_dir.resolve():
        raise ValueError(f"{src_dir} is the asset folder itself")
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        src, dest = src_dir / f, dest_dir / f
        if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
            status = "unchanged"
        else:
            status = "replaced" if dest.exists() else "added"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.installing")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        print(f"install {name}: {status} {dest}")
        written.append(dest)
    return written

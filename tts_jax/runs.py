"""Recording results so they are reproducible and never lost.

Every result records its seed, resolved config and package versions. Sweeps append one JSON line
per finished run with a single ``write`` followed by ``fsync``; a run killed mid-way leaves at most
a truncated last line, which :func:`read_jsonl` skips, so a resumed sweep simply re-runs it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
from typing import Any

import jax
import numpy as np

PACKAGES = ("tts-jax", "jax", "jaxlib", "flax", "optax", "numpy", "transformers", "diffusers")


def environment() -> dict[str, Any]:
    """Package versions, Python, platform and JAX devices of this process."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, arrays and numpy scalars to JSON-compatible values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically (temp file + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one record as a single line, flushed to disk before returning."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), sort_keys=True) + "\n"
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # a killed writer left a partial line: never glue onto it
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file (a truncated last line is skipped)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

"""Recording results so they are reproducible and never lost.

Every result records its seed, resolved config and package versions. Sweeps append one JSON line
per finished run with a single ``write`` followed by ``fsync``; a run killed mid-way leaves at most
a truncated last line, which :func:`read_jsonl` skips, so a resumed sweep simply re-runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
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


# --------------------------------------------------------------------------- run identity

IDENTITY_PACKAGES = ("tts-jax", "jax", "jaxlib", "flax", "numpy")


def identity_versions() -> dict[str, str | None]:
    """Versions of the packages whose change can change a run's numbers (part of its identity)."""
    versions = environment()["versions"]
    return {name: versions.get(name) for name in IDENTITY_PACKAGES}


def config_id(config: dict[str, Any], versions: dict[str, Any] | None = None) -> str:
    """A short stable hash of a resolved config and the package versions: a run's identity.

    Two runs share an id exactly when every config field and every version in
    :data:`IDENTITY_PACKAGES` agree, so a resumed sweep never mistakes a run of other settings
    for a finished one.
    """
    versions = identity_versions() if versions is None else versions
    payload = json.dumps(to_jsonable({"config": config, "versions": versions}), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every field (recursively) on which two JSON configs differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def claim_sweep_folder(out_dir: str | os.PathLike, shared: dict[str, Any]) -> None:
    """Make ``out_dir`` the folder of ONE sweep configuration, or refuse it.

    A sweep folder's ``config.json`` records the configuration every run in it shares (all fields
    but the swept method, budget and seed) and the package versions. A new folder gets it
    written; a folder that holds another configuration, other versions, or runs without a
    recorded configuration is refused with the differences named, so results of different
    settings are never resumed, averaged or plotted together.

    Args:
        out_dir: the sweep folder.
        shared: the JSON-able shared configuration.

    Raises:
        ValueError: the folder belongs to another configuration.
    """
    path = pathlib.Path(out_dir) / "config.json"
    mine = {"sweep": to_jsonable(shared), "versions": identity_versions()}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); use another --out-dir") from None
        stored = {"sweep": theirs.get("sweep", {}), "versions": theirs.get("versions", {})}
        diff = config_differences(stored, mine)
        if diff:
            raise ValueError(
                f"{out_dir} holds a sweep of another configuration ({'; '.join(diff)}); "
                "use another --out-dir, or the same settings to resume it"
            )
        return
    if read_jsonl(pathlib.Path(out_dir) / "runs.jsonl"):
        raise ValueError(
            f"{out_dir}/runs.jsonl holds runs without a recorded sweep configuration "
            "(config.json); use another --out-dir"
        )
    write_json(path, {**mine, "environment": environment()})

"""Recording results so they are reproducible and never lost.

Every result records its seed, resolved config and package versions. Sweeps append one JSON line
per finished run with a single ``write`` followed by ``fsync``; a run killed mid-way leaves at most
a truncated last line, which :func:`read_jsonl` skips, so a resumed sweep simply re-runs it.

A sweep folder's runs live in ``runs.jsonl`` and, for a sweep split over several processes, in one
shard per process, ``runs.p<id>.jsonl`` (only its process appends to it). :func:`read_runs` reads
them all, one record per ``config_id``; :func:`merge_runs` writes that union to ``runs.jsonl``
(atomically: a temporary file renamed over it). Shards are never deleted, so a merge can only ever
be stale, never lose a line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import uuid
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: a temporary file of its own (so processes writing
    the same file at once never share one), flushed to disk, then renamed over ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened exclusively (mkstemp would make the file private to the user).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n")


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


# --------------------------------------------------------------------------- a sweep's run files

RUNS = "runs.jsonl"
_SHARD = re.compile(r"runs\.p(\d+)\.jsonl")


def shard_path(out_dir: str | os.PathLike, process_id: int) -> pathlib.Path:
    """The run file process ``process_id`` of a multi-process sweep appends to."""
    return pathlib.Path(out_dir) / f"runs.p{process_id}.jsonl"


def run_files(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """``runs.jsonl`` then every process shard of ``out_dir``, by process id (existing only)."""
    out_dir = pathlib.Path(out_dir)
    shards = {}
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            match = _SHARD.fullmatch(path.name)
            if match:
                shards[int(match.group(1))] = path
    main = [out_dir / RUNS] if (out_dir / RUNS).exists() else []
    return main + [shards[i] for i in sorted(shards)]


def read_runs(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a sweep folder, from :func:`run_files` in order, keeping the
    first record of each ``config_id`` (records without one are all kept)."""
    seen, out = set(), []
    for path in run_files(out_dir):
        for record in read_jsonl(path):
            cid = record.get("config_id")
            if cid is not None:
                if cid in seen:
                    continue
                seen.add(cid)
            out.append(record)
    return out


def merge_runs(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Write :func:`read_runs` to ``runs.jsonl`` (atomically; unchanged if it holds them already).

    Safe while other processes append to their shards (the shards stay), but the result is
    complete only once they have finished: merge at the end of a sweep.

    Returns:
        The merged records.
    """
    records = read_runs(out_dir)
    path = pathlib.Path(out_dir) / RUNS
    if read_jsonl(path) != records:
        lines = "".join(json.dumps(to_jsonable(r), sort_keys=True) + "\n" for r in records)
        write_text_atomic(path, lines)
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
    if not path.exists():
        # Runs are read BEFORE config.json is looked for again: every process writes config.json
        # before its first run, so runs seen here mean config.json exists by the second look
        # (processes of one sweep claiming a new folder at once never refuse each other).
        recorded = read_runs(out_dir)
        if not path.exists():
            if recorded:
                raise ValueError(
                    f"{out_dir} holds runs ({', '.join(p.name for p in run_files(out_dir))}) "
                    "without a recorded sweep configuration (config.json); use another --out-dir"
                )
            write_json(path, {**mine, "environment": environment()})
            return
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

"""Checkpoint folders (transformers / diffusers layouts, safetensors only): the one IO module.

Every loader and saver of :mod:`tts_jax.models` (DiT, VAE, LM, PRM, classifiers) goes through
this module; see docs/design.md, "Models we ship" and "How to add a model". It has three parts.

**Checks with clear messages.** A loader that meets a bad checkpoint says what is wrong and
where: the loader, the folder, the file and, for a config problem, the key, the expected type and
the value it found, e.g.::

    load_dit: config.json in /ckpt/dit: "sample_size" must be an int, got 'eight' (str)

Missing folders and files raise :class:`CheckpointNotFoundError` (a ``FileNotFoundError``); a file
that exists but cannot be used raises :class:`CheckpointError` (a ``ValueError``), a config
problem its subclass :class:`CheckpointConfigError`, and tensors that do not fit the model
:class:`TensorMismatchError` (naming every missing, unexpected and mis-shaped tensor).

**Tensor files.** :func:`read_tensors` reads a folder's weights into one flat ``name -> array``
dict (numpy, any dtype incl. ``bfloat16``): a single ``<name>.safetensors`` or the shards listed
by ``<name>.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``, the layout
``save_pretrained`` writes for large models). :func:`save_folder` writes ``config.json`` plus one
file or, with ``max_shard_size``, shards ``<stem>-00001-of-0000K.safetensors`` and the index.
Pickle checkpoints are never read.

**NNX state <-> flat names.** A :class:`Layout` says how a module's parameter at NNX path
``("a", 0, "kernel")`` is named in the file (``"a.0.weight"``) and how its axes are permuted
(PyTorch ``[out, in]`` vs Flax ``[in, out]``). :func:`load_params` fills an abstract module
(``nnx.eval_shape``) from a flat dict and :func:`export_params` flattens a module.

Typical loader::

    config = read_config(path, "load_x", XConfig.from_dict, schema=XConfig)
    abstract = nnx.eval_shape(lambda: X(config, rngs=nnx.Rngs(0)))
    model = load_params(abstract, read_tensors(path, "load_x", "model.safetensors"))

and saver: ``save_folder(path, config.to_dict(), export_params(model), "model.safetensors")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CONFIG_NAME = "config.json"
_MAX_REPR = 80
_MAX_LISTED = 20


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint folder, or a file it must hold, does not exist."""


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (unreadable, or not matching its config)."""


class CheckpointConfigError(CheckpointError):
    """A config file is not valid JSON, lacks a required key, or has a wrongly typed value."""


class TensorMismatchError(CheckpointError):
    """The tensors of a checkpoint do not fit the model its config describes.

    Attributes:
        missing: ``(name, expected file shape)`` of every parameter without a tensor.
        misshaped: ``(name, description of the tensor found, description expected)``.
        unexpected: names of the tensors no parameter reads.
    """

    def __init__(
        self,
        where: str,
        missing: Sequence[tuple[str, tuple[int, ...]]],
        misshaped: Sequence[tuple[str, str, str]],
        unexpected: Sequence[str],
    ):
        self.missing = list(missing)
        self.misshaped = list(misshaped)
        self.unexpected = list(unexpected)
        problems = []
        if missing:
            s = "s" if len(missing) > 1 else ""
            listed = _listed([f"{n!r} (expected shape {shape})" for n, shape in missing])
            problems.append(f"missing tensor{s} {listed}")
        problems += [f"tensor {n!r} {got}, expected {want}" for n, got, want in misshaped]
        if unexpected:
            s = "s" if len(unexpected) > 1 else ""
            problems.append(f"unexpected tensor{s} " + _listed([repr(n) for n in unexpected]))
        super().__init__(f"{where} do not match config.json: " + "; ".join(problems))


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "the folder is empty"
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return "it holds " + ", ".join(names[:_MAX_LISTED]) + more


def _hint(hint: str | None) -> str:
    return f"; {hint}" if hint else ""


def require_folder(path: str | Path, loader: str, hint: str | None = None) -> Path:
    """``path`` as a :class:`Path`, checked to be an existing directory.

    Args:
        path: the checkpoint folder.
        loader: name of the calling loader, the first word of every message.
        hint: appended to the message (e.g. which script builds the checkpoint).

    Raises:
        CheckpointNotFoundError: ``"<loader>: folder <path> does not exist"`` or ``"... is not a
            directory"``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{loader}: folder {path} does not exist{_hint(hint)}")
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{loader}: {path} is not a directory (a checkpoint is a folder){_hint(hint)}"
        )
    return path


def require_file(folder: str | Path, name: str, loader: str, hint: str | None = None) -> Path:
    """``folder / name``, checked to be a file (the folder is checked first).

    Raises:
        CheckpointNotFoundError: naming the folder, the missing file and what the folder holds.
    """
    folder = require_folder(folder, loader, hint)
    file = folder / name
    if not file.is_file():
        raise CheckpointNotFoundError(
            f"{loader}: folder {folder} has no {name} ({_listing(folder)}){_hint(hint)}"
        )
    return file


def require_files(folder: str | Path, pattern: str, loader: str, note: str = "") -> list[Path]:
    """The files of ``folder`` matching the glob ``pattern`` (sorted), at least one.

    Raises:
        CheckpointNotFoundError: no file matches (naming the folder, the pattern and its content).
    """
    folder = require_folder(folder, loader)
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not found:
        raise CheckpointNotFoundError(
            f"{loader}: folder {folder} has no {pattern} file{_hint(note)} ({_listing(folder)})"
        )
    return found


@contextlib.contextmanager
def safetensors_errors(file: Path, loader: str) -> Iterator[None]:
    """Turns a safetensors read failure inside the block into a :class:`CheckpointError` that
    names the file and its folder."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(
            f"{loader}: {file.name} in {file.parent} is not a readable safetensors file: {e}"
        ) from e


# --------------------------------------------------------------------------- config files


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A parsed JSON config and where it came from (for messages).

    Attributes:
        loader: the loader reading it.
        folder: the checkpoint folder.
        name: the file name inside ``folder``.
        raw: the parsed JSON object.
    """

    loader: str
    folder: Path
    name: str
    raw: dict[str, Any]

    @property
    def where(self) -> str:
        """``"<loader>: <name> in <folder>"``, the prefix of every message about this file."""
        return f"{self.loader}: {self.name} in {self.folder}"

    def check(self, types_: Mapping[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
        """Checks required keys and value types (see :func:`check_config`); returns ``raw``."""
        check_config(self.raw, types_, required, self.where)
        return self.raw

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Re-raises a ``ValueError``/``TypeError``/``KeyError`` of a config parser run inside
        the block as a :class:`CheckpointConfigError` prefixed with :attr:`where`."""
        try:
            yield
        except CheckpointError:
            raise
        except KeyError as e:
            raise CheckpointConfigError(
                f"{self.where} lacks the required key {_quote(e.args[0])}"
            ) from e
        except (ValueError, TypeError) as e:
            raise CheckpointConfigError(f"{self.where}: {e}") from e


def read_json_file(file: str | Path, loader: str) -> dict[str, Any]:
    """The JSON object in ``file``.

    Raises:
        CheckpointNotFoundError: the file (or its folder) does not exist.
        CheckpointConfigError: the file is not UTF-8 JSON (with the line and column), or holds
            something other than an object.
    """
    file = Path(file)
    return read_config_file(file.parent, loader, file.name).raw


def read_config_file(
    folder: str | Path, loader: str, name: str = CONFIG_NAME, hint: str | None = None
) -> ConfigFile:
    """Reads ``folder / name`` as a JSON object, checking the folder and the file first.

    Raises:
        CheckpointNotFoundError: the folder or the file does not exist.
        CheckpointConfigError: invalid JSON (naming the line and column) or not an object.
    """
    file = require_file(folder, name, loader, hint)
    folder = file.parent
    where = f"{loader}: {name} in {folder}"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointConfigError(
            f"{where} is invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from e
    except UnicodeDecodeError as e:
        raise CheckpointConfigError(f"{where} is invalid JSON: not UTF-8 text ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointConfigError(f"{where} must hold a JSON object, got {_type_name(raw)}")
    return ConfigFile(loader, folder, name, raw)


def read_config(
    folder: str | Path,
    loader: str,
    parse: Callable[[dict[str, Any]], Any] | None = None,
    *,
    schema: type | Mapping[str, Any] | None = None,
    required: Sequence[str] | None = None,
    name: str = CONFIG_NAME,
    hint: str | None = None,
) -> Any:
    """Reads, type-checks and parses a folder's JSON config in one call.

    Args:
        folder: the checkpoint folder.
        loader: the calling loader's name (first word of every message).
        parse: turns the checked dict into the config (e.g. ``XConfig.from_dict``); its
            ``ValueError`` / ``TypeError`` / ``KeyError`` become a :class:`CheckpointConfigError`
            naming the file. ``None`` returns the dict.
        schema: expected JSON type per key: a dataclass (its annotated fields, see
            :func:`field_types`) or a ``{key: type}`` mapping; ``None`` checks no types.
        required: keys that must be present (default: a dataclass schema's fields without a
            default, else none).
        name: the file name inside ``folder``.
        hint: appended to a missing-folder / missing-file message.

    Returns:
        ``parse(raw)``, or the raw dict when ``parse`` is ``None``.

    Raises:
        CheckpointNotFoundError: the folder or the file does not exist.
        CheckpointConfigError: invalid JSON, not an object, a missing or wrongly typed key, or a
            value ``parse`` refuses; every message names the loader, the file, the folder and the
            key.
    """
    config_file = read_config_file(folder, loader, name, hint)
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        required = required_fields(schema) if required is None else required
        schema = field_types(schema)
    config_file.check(schema or {}, required or ())
    if parse is None:
        return config_file.raw
    with config_file.errors():
        return parse(config_file.raw)


def write_config(folder: str | Path, config: Mapping[str, Any], name: str = CONFIG_NAME) -> Path:
    """Writes ``config`` as ``folder / name`` the way transformers and diffusers do (indented,
    sorted keys, final newline); returns the file."""
    file = Path(folder) / name
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return file


# --------------------------------------------------------------------------- typed keys


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: annotated type}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def required_fields(cls: type) -> tuple[str, ...]:
    """The dataclass fields without a default."""
    return tuple(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def check_config(
    raw: Mapping[str, Any], types_: Mapping[str, Any], required: Sequence[str], where: str
) -> None:
    """Checks that the ``required`` keys are present and that every key of ``types_`` present in
    ``raw`` has its type. Keys not in ``types_`` are not checked.

    Types are Python annotations of JSON values: ``int`` (not ``bool``), ``float`` (an int is
    accepted), ``bool``, ``str``, ``None``, ``dict``, ``list[X]`` / ``tuple[X, ...]`` (a JSON list),
    ``tuple[X, Y]`` (a list of that length) and unions of these; other annotations are not
    checked.

    Args:
        raw: the parsed config.
        types_: expected type per key.
        required: keys that must be present.
        where: message prefix naming the file, e.g. :attr:`ConfigFile.where`.

    Raises:
        CheckpointConfigError: listing every missing key, or every wrongly typed key with the
            expected type and the value received.
    """
    missing = [k for k in required if k not in raw]
    if missing:
        keys = ", ".join(_quote(k) for k in missing)
        plural = "s" if len(missing) > 1 else ""
        raise CheckpointConfigError(f"{where} lacks the required key{plural} {keys}")
    problems = [
        f"{_quote(key)} must be {_describe(tp)}, got {_short_repr(raw[key])} "
        f"({type(raw[key]).__name__})"
        for key, tp in types_.items()
        if key in raw and _matches(raw[key], tp) is False
    ]
    if problems:
        raise CheckpointConfigError(f"{where}: " + "; ".join(problems))


def _quote(key: Any) -> str:
    return json.dumps(key) if isinstance(key, str) else repr(key)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _matches(value: Any, tp: Any) -> bool | None:
    """Whether the JSON ``value`` has type ``tp``; ``None`` when ``tp`` is not checked."""
    if tp is Any:
        return None
    if tp is None or tp is type(None):
        return value is None
    if _is_union(tp):
        results = [_matches(value, a) for a in _args(tp)]
        return True if True in results else (None if None in results else False)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp) or tp
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            return False
        args = _args(tp)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return False
            results = [_matches(v, a) for v, a in zip(value, args, strict=True)]
        else:
            results = [_matches(v, args[0]) for v in value]
        return False if False in results else (None if None in results else True)
    return None


_PLURALS = {"an int": "ints", "a number": "numbers", "a boolean": "booleans", "a string": "strings"}


def _describe(tp: Any) -> str:
    """``"an int"``, ``"a list of ints"``, ``"a number or null"``, ..."""
    if tp is None or tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in _args(tp))
    simple = {bool: "a boolean", int: "an int", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    origin = typing.get_origin(tp) or tp
    if origin in (dict, Mapping):
        return "an object"
    if origin in (list, tuple, Sequence):
        args = _args(tp)
        if not args:
            return "a list"
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        item = _describe(args[0])
        items = _PLURALS.get(item, f"({item})")
        if fixed and len(set(args)) == 1:
            return f"a list of {len(args)} {items}"
        if fixed:
            return "a list of [" + ", ".join(_describe(a) for a in args) + "]"
        return f"a list of {items}"
    return getattr(tp, "__name__", str(tp))


def _listed(items: Sequence[str]) -> str:
    """``"a, b, c"``, at most :data:`_MAX_LISTED` items then ``"... (k more)"``."""
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


# --------------------------------------------------------------------------- tensor files

SAFETENSORS = ".safetensors"
WEIGHTS_NAME = "model.safetensors"  # transformers (and our classifiers)
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers models
INDEX_SUFFIX = ".index.json"  # model.safetensors -> model.safetensors.index.json


class TensorFile(dict):
    """The tensors of a checkpoint (flat ``name -> numpy array``) and where they came from.

    Attributes:
        source: ``"<file> in <folder>"`` (for messages).
        loader: the loader that read them (first word of messages), or ``None``.
        origin: ``name -> file name`` when read from several files (empty for one file).
    """

    def __init__(
        self,
        tensors: Mapping[str, np.ndarray],
        source: str,
        loader: str | None = None,
        origin: Mapping[str, str] | None = None,
    ):
        super().__init__(tensors)
        self.source = source
        self.loader = loader
        self.origin = dict(origin or {})

    @property
    def where(self) -> str:
        """``"<loader>: the tensors of <source>"``, the prefix of a mismatch message."""
        prefix = f"{self.loader}: " if self.loader else ""
        return f"{prefix}the tensors of {self.source}"


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of a folder, found by :func:`find_weights` (nothing read yet).

    Attributes:
        loader: the loader (first word of messages).
        folder: the checkpoint folder.
        files: the files to read, in order (one file, or the shards of ``index``).
        index: the ``*.safetensors.index.json`` the shards were listed in, or ``None``.
        weight_map: the index's ``tensor name -> shard file name`` (empty without an index).
    """

    loader: str
    folder: Path
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def source(self) -> str:
        """``"model.safetensors in /ckpt"`` (the index for shards, all names for a glob)."""
        names = [self.index.name] if self.index else [f.name for f in self.files]
        return f"{', '.join(names)} in {self.folder}"

    def read(self) -> TensorFile:
        """All tensors as one flat dict (numpy arrays, dtypes as stored).

        Raises:
            CheckpointError: a file is not readable safetensors, a tensor appears in two files,
                or a shard lacks a tensor the index assigns to it (naming the file and tensor).
        """
        tensors: dict[str, np.ndarray] = {}
        origin: dict[str, str] = {}
        for file in self.files:
            with safetensors_errors(file, self.loader):
                part = load_file(str(file))
            for name in part:
                if name in origin:
                    raise CheckpointError(
                        f"{self.loader}: tensor {name!r} is in both {origin[name]} and "
                        f"{file.name} in {self.folder}"
                    )
                origin[name] = file.name
            tensors |= part
        listed = [n for n, f in self.weight_map.items() if origin.get(n) != f]
        if listed:
            n = listed[0]
            raise CheckpointError(
                f"{self.loader}: {self.index.name} in {self.folder} assigns tensor {n!r} to "
                f"{self.weight_map[n]}, which does not hold it"
                + (f" ({len(listed) - 1} more such tensors)" if len(listed) > 1 else "")
            )
        several = len(self.files) > 1
        return TensorFile(tensors, self.source, self.loader, origin if several else None)


def find_weights(
    folder: str | Path, loader: str, weights_name: str | None = None, hint: str | None = None
) -> WeightFiles:
    """Locates a folder's weights without reading them.

    With ``weights_name`` (e.g. ``"model.safetensors"``): that file, else the shards listed by
    ``<weights_name>.index.json``. Without: the shards of the folder's one
    ``*.safetensors.index.json`` if there is one, else every ``*.safetensors`` file (sorted).

    Raises:
        CheckpointNotFoundError: the folder, the weights, or a shard the index lists is missing
            (naming the folder, the file and what the folder holds).
        CheckpointConfigError: the index is not JSON or has no ``weight_map`` of file names.
        CheckpointError: a folder holds several indexes (without ``weights_name``).
    """
    folder = require_folder(folder, loader, hint)
    if weights_name is not None:
        single = folder / weights_name
        if single.is_file():
            return WeightFiles(loader, folder, (single,))
        if (folder / (weights_name + INDEX_SUFFIX)).is_file():
            return _read_index(folder, weights_name + INDEX_SUFFIX, loader)
        require_file(folder, weights_name, loader, hint)  # raises, listing the folder
    indexes = sorted(p.name for p in folder.glob(f"*{SAFETENSORS}{INDEX_SUFFIX}") if p.is_file())
    if len(indexes) > 1:
        raise CheckpointError(f"{loader}: folder {folder} holds several indexes {indexes}")
    if indexes:
        return _read_index(folder, indexes[0], loader)
    note = hint or (
        "expected model.safetensors or its shards model-*-of-*.safetensors; pickle checkpoints "
        "are refused"
    )
    return WeightFiles(
        loader, folder, tuple(require_files(folder, f"*{SAFETENSORS}", loader, note))
    )


def _read_index(folder: Path, name: str, loader: str) -> WeightFiles:
    """The shards listed by ``folder / name`` (``{"weight_map": {tensor: file}}``)."""
    index = read_config_file(folder, loader, name)
    index.check({"weight_map": dict}, ("weight_map",))
    weight_map: dict[str, str] = index.raw["weight_map"]

    def is_shard(f: Any) -> bool:
        return isinstance(f, str) and Path(f).name == f and f.endswith(SAFETENSORS)

    bad = [f for f in dict.fromkeys(weight_map.values()) if not is_shard(f)]
    if bad:
        raise CheckpointConfigError(
            f'{index.where}: "weight_map" must map tensor names to *.safetensors files of the '
            f"folder, got {_short_repr(bad)}"
        )
    shards = dict.fromkeys(weight_map.values())  # first-listed order, no duplicates
    files = tuple(require_file(folder, f, loader, hint=f"{name} lists it") for f in shards)
    return WeightFiles(loader, folder, files, folder / name, weight_map)


def read_tensors(
    folder: str | Path, loader: str, weights_name: str | None = None, hint: str | None = None
) -> TensorFile:
    """All tensors of a folder's weights (see :func:`find_weights`) as one flat dict.

    Args:
        folder: the checkpoint folder.
        loader: the calling loader's name (first word of every message).
        weights_name: the single-file name (``"model.safetensors"`` for transformers,
            ``"diffusion_pytorch_model.safetensors"`` for diffusers); its
            ``<weights_name>.index.json`` is read when the single file is absent. ``None``: any
            ``*.safetensors`` (or the folder's index).
        hint: appended to a missing-file message.

    Returns:
        :class:`TensorFile` ``{name: np.ndarray}``.

    Raises:
        CheckpointNotFoundError, CheckpointConfigError, CheckpointError: see
            :func:`find_weights` and :meth:`WeightFiles.read`.
    """
    return find_weights(folder, loader, weights_name, hint).read()


def save_tensors(
    folder: str | Path,
    tensors: Mapping[str, Any],
    weights_name: str,
    *,
    max_shard_size: int | None = None,
) -> list[Path]:
    """Writes a flat dict as ``weights_name`` or, over ``max_shard_size`` bytes, as shards.

    Shards are filled in ``tensors`` order, each up to ``max_shard_size`` bytes (a larger tensor
    gets a shard of its own), named ``<stem>-00001-of-0000K.safetensors``, and listed in
    ``<weights_name>.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor:
    file}}``), as transformers' and diffusers' ``save_pretrained`` do. Files of an earlier save
    under the same name (the single file, old shards, the index) are removed, so a folder never
    holds two versions. Files carry the ``{"format": "pt"}`` metadata transformers expects.

    Args:
        folder: created if needed.
        tensors: ``name -> array`` (numpy or JAX, any dtype).
        weights_name: e.g. ``"model.safetensors"``.
        max_shard_size: bytes per shard; ``None`` writes one file.

    Returns:
        The files written (the index last).
    """
    if not weights_name.endswith(SAFETENSORS):
        raise ValueError(f"weights_name must end in {SAFETENSORS}, got {weights_name!r}")
    if max_shard_size is not None and max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    total = sum(a.nbytes for a in arrays.values())
    stem = weights_name[: -len(SAFETENSORS)]
    groups: list[dict[str, np.ndarray]] = [{}]
    if max_shard_size is not None and total > max_shard_size:
        size = 0
        for name, a in arrays.items():
            if groups[-1] and size + a.nbytes > max_shard_size:
                groups.append({})
                size = 0
            groups[-1][name] = a
            size += a.nbytes
    else:
        groups[0] = arrays
    if len(groups) == 1:
        names = [weights_name]
    else:
        names = [
            f"{stem}-{i + 1:05d}-of-{len(groups):05d}{SAFETENSORS}" for i in range(len(groups))
        ]
    index = folder / (weights_name + INDEX_SUFFIX)
    written = []
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(folder / name), metadata={"format": "pt"})
        written.append(folder / name)
    if len(groups) > 1:
        weight_map = {t: f for f, g in zip(names, groups, strict=True) for t in g}
        content = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        written.append(write_config(folder, content, index.name))
    # Only now remove what an earlier save left under this name (nothing is lost on a failure).
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(SAFETENSORS))
    stale = [folder / weights_name, index, *folder.glob(f"{stem}-*-of-*{SAFETENSORS}")]
    for old in stale:
        is_ours = old.name in (weights_name, index.name) or shard.fullmatch(old.name)
        if is_ours and old not in written and old.is_file():
            old.unlink()
    return written


def save_folder(
    folder: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    weights_name: str,
    *,
    max_shard_size: int | None = None,
) -> list[Path]:
    """Writes ``config.json`` (:func:`write_config`) and the tensors (:func:`save_tensors`): a
    folder that transformers / diffusers ``from_pretrained`` and :func:`read_tensors` load.

    Returns:
        The files written.
    """
    written = save_tensors(folder, tensors, weights_name, max_shard_size=max_shard_size)
    return [write_config(folder, config), *written]


# --------------------------------------------------------------------------- NNX <-> flat names

# (NNX leaf name, ndim) -> permutation taking the NNX array to the file array, or None.
AxesFn = Callable[[str, int], "tuple[int, ...] | None"]


def flat_name(path: Sequence[Any]) -> str:
    """``"a.0.b"`` for the NNX path ``("a", 0, "b")``."""
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the parameters of an NNX module are named and laid out in a flat tensor file.

    The file name of the parameter at NNX path ``(*parents, leaf)`` is
    ``rename(".".join([*parents, leaf_names.get(leaf, leaf)]))``; its array is the NNX array with
    axes permuted by ``axes(leaf, ndim)`` (``None``: as is). The default layout is the identity
    (modules that already store PyTorch names and shapes, like :mod:`tts_jax.models.lm`).

    Attributes:
        rename: per-model renames of the dotted name (e.g. diffusers' ``to_out.0``).
        leaf_names: NNX leaf name -> file leaf name.
        axes: see :data:`AxesFn`.
    """

    rename: Callable[[str], str] | None = None
    leaf_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    axes: AxesFn | None = None

    def name(self, path: Sequence[Any]) -> str:
        """File tensor name of the parameter at NNX ``path``."""
        *parents, leaf = (str(p) for p in path)
        dotted = flat_name([*parents, self.leaf_names.get(leaf, leaf)])
        return dotted if self.rename is None else self.rename(dotted)

    def _perm(self, path: Sequence[Any], ndim: int) -> tuple[int, ...] | None:
        return None if self.axes is None else self.axes(str(path[-1]), ndim)

    def file_shape(self, path: Sequence[Any], shape: Sequence[int]) -> tuple[int, ...]:
        """Shape in the file of an NNX parameter of shape ``shape``."""
        perm = self._perm(path, len(shape))
        return tuple(shape) if perm is None else tuple(shape[i] for i in perm)

    def to_file(self, path: Sequence[Any], array: np.ndarray) -> np.ndarray:
        """NNX array -> file array."""
        perm = self._perm(path, array.ndim)
        return array if perm is None else np.transpose(array, perm)

    def from_file(self, path: Sequence[Any], array: np.ndarray) -> np.ndarray:
        """File array -> NNX array."""
        perm = self._perm(path, array.ndim)
        return array if perm is None else np.transpose(array, np.argsort(perm))


def torch_axes(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """Flax ``nnx.Linear`` kernels ``[in, out]`` and ``nnx.Conv`` kernels ``[kh, kw, in, out]``
    against PyTorch's ``[out, in]`` and ``[out, in, kh, kw]``."""
    if leaf == "kernel" and ndim == 2:
        return (1, 0)
    if leaf == "kernel" and ndim == 4:
        return (3, 2, 0, 1)
    return None


IDENTITY = Layout()
"""Parameters stored under their dotted NNX paths, arrays as they are."""

TORCH = Layout(
    leaf_names={"kernel": "weight", "scale": "weight", "embedding": "weight"}, axes=torch_axes
)
"""Flax's built-in layers (``nnx.Linear``, ``nnx.Conv``, norms, ``nnx.Embed``) under PyTorch's
names and layouts, the diffusers layout; add a model's renames with
``dataclasses.replace(TORCH, rename=...)``."""


def _describe_array(dtype: Any, shape: Sequence[int]) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def load_params(
    abstract: nnx.Module,
    tensors: Mapping[str, Any],
    layout: Layout = IDENTITY,
    *,
    dtype: Any = None,
    strict_dtype: bool = False,
    ignore: Iterable[str] = (),
    ignore_suffixes: Sequence[str] = (),
) -> nnx.Module:
    """Fills an abstract module (``nnx.eval_shape``) from a flat ``name -> array`` dict.

    Every variable of ``abstract`` reads tensor ``layout.name(path)``, which must have the shape
    ``layout.file_shape(path, shape)``; it is permuted back (``layout.from_file``) and cast to
    ``dtype`` (default: the abstract variable's dtype). Every tensor must be read, except those in
    ``ignore`` or ending in one of ``ignore_suffixes`` (non-parameter buffers).

    Args:
        abstract: module whose variables define the names, shapes and dtypes expected.
        tensors: flat dict, e.g. :func:`read_tensors` (a :class:`TensorFile` names its file and
            shard in messages).
        layout: see :class:`Layout`.
        dtype: parameter dtype; ``None`` keeps each abstract variable's dtype.
        strict_dtype: the file's dtype must equal the parameter's (no cast).
        ignore: tensor names allowed to be unused.
        ignore_suffixes: name endings allowed to be unused.

    Returns:
        The populated module.

    Raises:
        TensorMismatchError: listing every missing, mis-shaped (or, with ``strict_dtype``,
            wrongly typed) and unexpected tensor, and the file they came from.
    """
    graphdef, state = nnx.split(abstract)
    origin = getattr(tensors, "origin", {})
    flat, used, missing, misshaped = [], set(ignore), [], []
    for path, var in nnx.to_flat_state(state):
        name, spec = layout.name(path), var.get_value()
        want_dtype = np.dtype(spec.dtype if dtype is None else dtype)
        want = layout.file_shape(path, spec.shape)
        used.add(name)
        if name not in tensors:
            missing.append((name, want))
            continue
        t = tensors[name]
        got_shape = tuple(np.shape(t))
        shard = f"(in {origin[name]}) " if name in origin else ""
        if strict_dtype and (got_shape != want or np.dtype(t.dtype) != want_dtype):
            got = f"{shard}is {_describe_array(t.dtype, got_shape)}"
            misshaped.append((name, got, _describe_array(want_dtype, want)))
        elif got_shape != want:
            misshaped.append((name, f"{shard}has shape {got_shape}", str(want)))
        else:
            value = layout.from_file(path, np.asarray(t))
            flat.append((path, var.replace(jnp.asarray(value, want_dtype))))
    unexpected = sorted(
        k for k in tensors if k not in used and not k.endswith(tuple(ignore_suffixes))
    )
    if missing or misshaped or unexpected:
        where = getattr(tensors, "where", "the tensors")
        raise TensorMismatchError(where, missing, misshaped, unexpected)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_params(
    module: nnx.Module, layout: Layout = IDENTITY, dtype: Any = None
) -> dict[str, np.ndarray]:
    """The flat ``name -> array`` dict of ``module``'s ``nnx.Param`` variables (host numpy,
    contiguous, in ``layout``; cast to ``dtype`` if given), ready for :func:`save_tensors`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        out[layout.name(path)] = np.ascontiguousarray(layout.to_file(path, array))
    return out

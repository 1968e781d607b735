"""Checks with clear messages for every checkpoint loader: folders, files, JSON configs and keys.

A loader that meets a bad checkpoint should say what is wrong and where: the loader, the folder,
the file and, for a config problem, the key, the expected type and the value it found, e.g.::

    load_dit: config.json in /ckpt/dit: "sample_size" must be an int, got 'eight' (str)

Missing folders and files raise :class:`CheckpointNotFoundError` (a ``FileNotFoundError``); a file
that exists but cannot be used raises :class:`CheckpointError` (a ``ValueError``), and a config
problem its subclass :class:`CheckpointConfigError`.

Typical use in a loader::

    config_file = read_config_file(path, "load_x")   # folder, file, JSON object
    config_file.check(field_types(XConfig), required=required_fields(XConfig))
    with config_file.errors():                       # the parser's own errors name the file
        config = XConfig.from_dict(config_file.raw)
    weights = require_file(path, "model.safetensors", "load_x")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

CONFIG_NAME = "config.json"
_MAX_REPR = 80
_MAX_LISTED = 20


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint folder, or a file it must hold, does not exist."""


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (unreadable, or not matching its config)."""


class CheckpointConfigError(CheckpointError):
    """A config file is not valid JSON, lacks a required key, or has a wrongly typed value."""


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

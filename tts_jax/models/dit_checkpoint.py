"""Safetensors <-> Flax NNX weight transfer for diffusers-layout checkpoints (DiT, AutoencoderKL).

Our NNX modules name their sub-modules after diffusers' attributes, so a parameter's NNX path maps
to its PyTorch state-dict key by joining the path with dots, renaming the leaf (``kernel``,
``scale`` and ``embedding`` are PyTorch's ``weight``) and a few per-model renames (``key_fn``).
Layouts differ only for kernels: a linear kernel is stored ``[in, out]`` (PyTorch ``[out, in]``)
and a convolution kernel ``[kh, kw, in, out]`` (PyTorch ``[out, in, kh, kw]``).

Only safetensors files are read or written (never pickles).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models.checkpoint_errors import (
    CheckpointError,
    field_types,
    read_config_file,
    require_file,
    required_fields,
    safetensors_errors,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

# (NNX path as a dotted string) -> PyTorch state-dict key
KeyFn = Callable[[str], str]


def torch_key(path: tuple[Any, ...], key_fn: KeyFn) -> str:
    """PyTorch state-dict key of the NNX parameter at ``path``."""
    *parents, leaf = (str(p) for p in path)
    return key_fn(".".join([*parents, _LEAF_RENAMES.get(leaf, leaf)]))


def _to_jax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def read_config(
    folder: str | Path,
    *,
    loader: str = "load_dit",
    config_cls: type | None = None,
    required: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a diffusers model folder as a dict, checked against ``config_cls``.

    The folder and the file must exist, the file must be a JSON object, the ``required`` keys
    must be present, every ``config_cls`` field present must have its annotated type, and
    ``config_cls.from_dict`` must accept the dict. Every error names the loader, the folder, the
    file and the key (:mod:`tts_jax.models.checkpoint_errors`).

    Args:
        folder: the checkpoint folder.
        loader: the calling loader's name (first word of the messages).
        config_cls: a config dataclass with a ``from_dict`` classmethod. Default:
            :class:`~tts_jax.models.dit.DiTConfig` with ``patch_size`` required, the settings of
            :func:`~tts_jax.models.dit.load_dit`, which calls this with the folder only.
        required: keys that must be present (default: the fields of ``config_cls`` without a
            default).

    Raises:
        CheckpointNotFoundError: the folder or its ``config.json`` does not exist.
        CheckpointConfigError: invalid JSON, a missing or wrongly typed key, or a value the
            config class refuses.
    """
    if config_cls is None:
        from tts_jax.models.dit import DiTConfig  # dit imports this module

        config_cls = DiTConfig
        required = ("patch_size",) if required is None else required
    if required is None:
        required = required_fields(config_cls)
    config_file = read_config_file(folder, loader, CONFIG_NAME)
    config_file.check(field_types(config_cls), required)
    with config_file.errors():
        config_cls.from_dict(config_file.raw)
    return config_file.raw


class TensorFile(dict):
    """The tensors of one safetensors file (name -> array), remembering the file for messages."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        super().__init__(tensors)
        self.source = source


def load_state(abstract_model: nnx.Module, tensors: dict[str, np.ndarray], key_fn: KeyFn):
    """Fill an (abstract, e.g. ``nnx.eval_shape``) model with PyTorch-layout tensors.

    Args:
        abstract_model: the module whose parameter shapes define what must be present.
        tensors: PyTorch state dict (key -> array), e.g. from a safetensors file.
        key_fn: per-model renames applied to the dotted NNX path.

    Returns:
        The populated module (float32 parameters).

    Raises:
        CheckpointError: a ``ValueError`` naming the tensor (and the file, for a
            :class:`TensorFile`) if a parameter is missing, has the wrong shape, or the file holds
            a tensor the model does not use.
    """
    source = getattr(tensors, "source", "checkpoint")
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = []
    used = set()
    for path, var in nnx.to_flat_state(abstract_state):
        key = torch_key(path, key_fn)
        if key not in tensors:
            raise CheckpointError(
                f"{source} is missing tensor {key!r} (shape {var.get_value().shape})"
            )
        value = _to_jax_layout(str(path[-1]), np.asarray(tensors[key]))
        if value.shape != var.get_value().shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tensors[key].shape}, the config expects "
                f"the PyTorch-layout shape of {var.get_value().shape}"
            )
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointError(f"{source} has tensors the config does not use: {unexpected}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_state(model: nnx.Module, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """The PyTorch state dict (float32, contiguous numpy arrays) of ``model``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(jax.device_get(var.get_value()), np.float32)
        out[torch_key(path, key_fn)] = np.ascontiguousarray(_to_torch_layout(str(path[-1]), array))
    return out


def load_tensors(folder: str | Path, loader: str = "load_dit") -> TensorFile:
    """All tensors of ``folder/diffusion_pytorch_model.safetensors``.

    Raises:
        CheckpointNotFoundError: the folder or the file does not exist (only safetensors are
            read, never pickles).
        CheckpointError: the file is not a readable safetensors file.
    """
    path = require_file(folder, WEIGHTS_NAME, loader, hint="only safetensors are supported")
    with safetensors_errors(path, loader):
        tensors = load_file(str(path))
    return TensorFile(tensors, f"{WEIGHTS_NAME} in {path.parent}")


def save_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, np.ndarray]):
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

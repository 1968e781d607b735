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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

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


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers model folder as a dict."""
    return json.loads((Path(folder) / CONFIG_NAME).read_text())


def load_state(abstract_model: nnx.Module, tensors: dict[str, np.ndarray], key_fn: KeyFn):
    """Fill an (abstract, e.g. ``nnx.eval_shape``) model with PyTorch-layout tensors.

    Args:
        abstract_model: the module whose parameter shapes define what must be present.
        tensors: PyTorch state dict (key -> array), e.g. from a safetensors file.
        key_fn: per-model renames applied to the dotted NNX path.

    Returns:
        The populated module (float32 parameters).

    Raises:
        ValueError: naming the tensor, if a parameter is missing, has the wrong shape, or the file
            holds a tensor the model does not use.
    """
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = []
    used = set()
    for path, var in nnx.to_flat_state(abstract_state):
        key = torch_key(path, key_fn)
        if key not in tensors:
            raise ValueError(
                f"checkpoint is missing tensor {key!r} (shape {var.get_value().shape})"
            )
        value = _to_jax_layout(str(path[-1]), np.asarray(tensors[key]))
        if value.shape != var.get_value().shape:
            raise ValueError(
                f"tensor {key!r} has shape {tensors[key].shape}, the config expects the "
                f"PyTorch-layout shape of {var.get_value().shape}"
            )
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the config does not use: {unexpected}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_state(model: nnx.Module, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """The PyTorch state dict (float32, contiguous numpy arrays) of ``model``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(jax.device_get(var.get_value()), np.float32)
        out[torch_key(path, key_fn)] = np.ascontiguousarray(_to_torch_layout(str(path[-1]), array))
    return out


def load_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of ``folder/diffusion_pytorch_model.safetensors``."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder} (only safetensors are supported)")
    return load_file(str(path))


def save_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, np.ndarray]):
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

"""The diffusers folder layout (DiT, AutoencoderKL) on the checkpoint IO module.

Our NNX modules name their sub-modules after diffusers' attributes, so a parameter's NNX path maps
to its PyTorch state-dict key by joining the path with dots, renaming the leaf (``kernel``,
``scale`` and ``embedding`` are PyTorch's ``weight``) and a few per-model renames (``key_fn``).
Layouts differ only for kernels: a linear kernel is stored ``[in, out]`` (PyTorch ``[out, in]``)
and a convolution kernel ``[kh, kw, in, out]`` (PyTorch ``[out, in, kh, kw]``). That is the
:data:`tts_jax.models.checkpoint.TORCH` layout plus ``key_fn``; the reading, writing and checking
are :mod:`tts_jax.models.checkpoint` (docs/design.md, "Models we ship"). This module keeps the
diffusers-specific entry points :mod:`tts_jax.models.dit` calls.

Only safetensors files are read or written (never pickles); a folder may hold
``diffusion_pytorch_model.safetensors`` or its shards listed by
``diffusion_pytorch_model.safetensors.index.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.checkpoint import CONFIG_NAME, TensorFile

WEIGHTS_NAME = checkpoint.DIFFUSERS_WEIGHTS_NAME

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "KeyFn",
    "TensorFile",
    "diffusers_layout",
    "export_state",
    "load_state",
    "load_tensors",
    "read_config",
    "save_folder",
    "torch_key",
]

# (NNX path as a dotted string) -> PyTorch state-dict key
KeyFn = Callable[[str], str]


def diffusers_layout(key_fn: KeyFn) -> checkpoint.Layout:
    """The :data:`~tts_jax.models.checkpoint.TORCH` layout with a model's renames ``key_fn``."""
    return dataclasses.replace(checkpoint.TORCH, rename=key_fn)


def torch_key(path: tuple[Any, ...], key_fn: KeyFn) -> str:
    """PyTorch state-dict key of the NNX parameter at ``path``."""
    return diffusers_layout(key_fn).name(path)


def read_config(
    folder: str | Path,
    config_cls: type,
    *,
    loader: str = "load_dit",
    required: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a diffusers model folder as a dict, checked against ``config_cls``.

    The folder and the file must exist, the file must be a JSON object, the ``required`` keys
    must be present, every ``config_cls`` field present must have its annotated type, and
    ``config_cls.from_dict`` must accept the dict (:func:`tts_jax.models.checkpoint.read_config`;
    every error names the loader, the folder, the file and the key).

    Args:
        folder: the checkpoint folder.
        loader: the calling loader's name (first word of the messages).
        config_cls: a config dataclass with a ``from_dict`` classmethod (e.g.
            :class:`~tts_jax.models.dit.DiTConfig`).
        required: keys that must be present (default: the fields of ``config_cls`` without a
            default).

    Raises:
        CheckpointNotFoundError: the folder or its ``config.json`` does not exist.
        CheckpointConfigError: invalid JSON, a missing or wrongly typed key, or a value the
            config class refuses.
    """

    def check(raw: dict[str, Any]) -> dict[str, Any]:
        config_cls.from_dict(raw)
        return raw

    return checkpoint.read_config(folder, loader, check, schema=config_cls, required=required)


def load_state(
    abstract_model: nnx.Module,
    tensors: dict[str, np.ndarray],
    key_fn: KeyFn,
    *,
    dtype: Any = jnp.float32,
):
    """Fill an (abstract, e.g. ``nnx.eval_shape``) model with PyTorch-layout tensors.

    Args:
        abstract_model: the module whose parameter shapes define what must be present.
        tensors: PyTorch state dict (key -> array), e.g. :func:`load_tensors`.
        key_fn: per-model renames applied to the dotted NNX path.
        dtype: parameter dtype every tensor is cast to (the model's dtype, e.g. bfloat16).

    Returns:
        The populated module (parameters in ``dtype``).

    Raises:
        TensorMismatchError: a ``ValueError`` naming every missing, mis-shaped or unused tensor
            (and the file, for a :class:`~tts_jax.models.checkpoint.TensorFile`).
    """
    return checkpoint.load_params(abstract_model, tensors, diffusers_layout(key_fn), dtype=dtype)


def export_state(model: nnx.Module, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """The PyTorch state dict (float32, contiguous numpy arrays) of ``model``."""
    return checkpoint.export_params(model, diffusers_layout(key_fn), np.float32)


def load_tensors(folder: str | Path, loader: str = "load_dit") -> TensorFile:
    """All tensors of ``folder/diffusion_pytorch_model.safetensors`` (or of its shards).

    Raises:
        CheckpointNotFoundError: the folder or the file does not exist (only safetensors are
            read, never pickles).
        CheckpointError: the file is not a readable safetensors file.
    """
    return checkpoint.read_tensors(
        folder, loader, WEIGHTS_NAME, hint="only safetensors are supported"
    )


def save_folder(
    folder: str | Path,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    max_shard_size: int | None = None,
):
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or, with
    ``max_shard_size`` bytes, its shards and index) into ``folder``."""
    checkpoint.save_folder(folder, config, tensors, WEIGHTS_NAME, max_shard_size=max_shard_size)

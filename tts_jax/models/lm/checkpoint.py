"""Loading and saving the LM in the transformers folder layout (safetensors only).

A folder holds ``config.json`` (read by :func:`tts_jax.models.lm.config.read_lm_config`) and
``model.safetensors`` or its shards listed by ``model.safetensors.index.json``. Parameter
``a.b.0.c`` of a module is tensor ``"a.b.0.c"`` with the PyTorch shape, so loading is a
name-for-name copy and a saved folder loads in ``transformers.AutoModelForCausalLM``. The file
IO is :mod:`tts_jax.models.checkpoint`; see docs/design.md, "Models we ship".
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from tts_jax.models.checkpoint import (
    IDENTITY,
    WEIGHTS_NAME,
    TensorFile,
    export_params,
    flat_name,
    load_params,
    read_tensors,
    save_folder,
)
from tts_jax.models.lm.config import CAUSAL_LM_ARCHITECTURES, LMConfig, read_lm_config
from tts_jax.models.lm.modules import LM

# Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_tensors(path: pathlib.Path, loader: str = "load_weights") -> TensorFile:
    """Every tensor of the folder's index shards or ``*.safetensors`` files (numpy arrays)."""
    return read_tensors(path, loader)


_name = flat_name


def load_weights(
    abstract: nnx.Module,
    path: str | pathlib.Path,
    dtype: Any,
    ignore: Iterable[str] = (),
    *,
    loader: str = "load_weights",
) -> nnx.Module:
    """Fills an abstract module (``nnx.eval_shape``) from a folder's safetensors.

    Parameter ``a.b.0.c`` reads tensor ``"a.b.0.c"`` (same name and shape,
    :data:`~tts_jax.models.checkpoint.IDENTITY` layout) and is cast to ``dtype``; the folder's
    ``*.safetensors.index.json`` shards are read if it has one, else every ``*.safetensors``.
    Tensors in ``ignore`` or ending in a known buffer suffix are skipped, any other unused tensor
    is an error.

    Raises:
        FileNotFoundError: the folder does not exist, holds no ``*.safetensors`` or lacks a
            shard its index lists.
        ValueError: an unreadable file or index, or
            (:class:`~tts_jax.models.checkpoint.TensorMismatchError`) naming every missing,
            mis-shaped or unexpected tensor.
    """
    tensors = _read_tensors(pathlib.Path(path), loader)
    return load_params(
        abstract, tensors, IDENTITY, dtype=dtype, ignore=ignore, ignore_suffixes=_IGNORED_SUFFIXES
    )


def save_weights(
    module: nnx.Module,
    path: str | pathlib.Path,
    hf_config: dict[str, Any],
    *,
    max_shard_size: int | None = None,
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (parameters under their names, in their
    dtype), or with ``max_shard_size`` (bytes) shards plus ``model.safetensors.index.json``."""
    tensors = export_params(module, IDENTITY)
    save_folder(path, hf_config, tensors, WEIGHTS_NAME, max_shard_size=max_shard_size)


def load_lm(path: str | pathlib.Path, *, dtype: Any = jnp.float32) -> tuple[LMConfig, LM]:
    """Loads a Qwen2 / Llama causal LM from a local transformers folder.

    Args:
        path: folder with ``config.json`` and ``model.safetensors``, its shards listed by
            ``model.safetensors.index.json``, or other ``*.safetensors`` (pickle files are never
            read).
        dtype: parameter dtype.

    Returns:
        ``(config, model)``.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``*.safetensors`` is missing.
        ValueError: invalid JSON, a missing or wrongly typed config key, an unsupported
            architecture/config (naming the folder, the file and the key), or missing /
            mis-shaped / unexpected tensors (named).
    """
    _, config = read_lm_config(path, CAUSAL_LM_ARCHITECTURES.values(), loader="load_lm")
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0), dtype=dtype))
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return config, load_weights(abstract, path, dtype, ignore, loader="load_lm")


def save_lm(
    path: str | pathlib.Path, config: LMConfig, model: LM, *, max_shard_size: int | None = None
) -> None:
    """Saves ``config.json`` + ``model.safetensors`` (or, with ``max_shard_size`` bytes, shards
    and their index) loadable by ``AutoModelForCausalLM``."""
    save_weights(model, path, config.to_hf_dict(), max_shard_size=max_shard_size)

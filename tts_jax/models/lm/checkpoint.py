"""Loading and saving the LM in the transformers folder layout (safetensors only).

A folder holds ``config.json`` (read by :func:`tts_jax.models.lm.config.read_lm_config`) and
``model.safetensors`` (or its shards); parameter ``a.b.0.c`` of a module is tensor ``"a.b.0.c"``
with the PyTorch shape, so loading is a name-for-name copy and a saved folder loads in
``transformers.AutoModelForCausalLM``. See docs/design.md, "Models we ship".
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from tts_jax.models.checkpoint_errors import CheckpointError, require_files, safetensors_errors
from tts_jax.models.lm.config import CAUSAL_LM_ARCHITECTURES, LMConfig, read_lm_config
from tts_jax.models.lm.modules import LM

Array = jax.Array

# Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_tensors(path: pathlib.Path, loader: str = "load_weights") -> dict[str, Array]:
    files = require_files(
        path,
        "*.safetensors",
        loader,
        "expected model.safetensors or its "
        "shards model-*-of-*.safetensors; pickle checkpoints are refused",
    )
    tensors = {}
    for file in files:
        with safetensors_errors(file, loader), safe_open(file, framework="flax") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_weights(
    abstract: nnx.Module,
    path: str | pathlib.Path,
    dtype: Any,
    ignore: Iterable[str] = (),
    *,
    loader: str = "load_weights",
) -> nnx.Module:
    """Fills an abstract module (``nnx.eval_shape``) from a folder's ``*.safetensors``.

    Parameter ``a.b.0.c`` reads tensor ``"a.b.0.c"``; tensors in ``ignore`` or ending in a known
    buffer suffix are skipped, any other unused tensor is an error.

    Raises:
        FileNotFoundError: the folder does not exist or holds no ``*.safetensors``.
        ValueError: naming every missing, mis-shaped or unexpected tensor.
    """
    tensors = _read_tensors(pathlib.Path(path), loader)
    graphdef, state = nnx.split(abstract)
    flat, problems = [], []
    for p, var in nnx.to_flat_state(state):
        name, want = _name(p), var.get_value().shape
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (expected shape {want})")
        elif tensors[name].shape != want:
            problems.append(f"tensor {name!r} has shape {tensors[name].shape}, expected {want}")
        else:
            flat.append((p, var.replace(jnp.asarray(tensors[name], dtype))))
    used = {_name(p) for p, _ in nnx.to_flat_state(state)} | set(ignore)
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    problems += [f"unexpected tensor {k!r}" for k in extra]
    if problems:
        raise CheckpointError(
            f"{loader}: the *.safetensors in {path} do not match config.json: "
            + "; ".join(problems)
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_weights(module: nnx.Module, path: str | pathlib.Path, hf_config: dict[str, Any]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (parameters under their names)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        _name(p): jnp.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))


def load_lm(path: str | pathlib.Path, *, dtype: Any = jnp.float32) -> tuple[LMConfig, LM]:
    """Loads a Qwen2 / Llama causal LM from a local transformers folder.

    Args:
        path: folder with ``config.json`` and ``*.safetensors`` (pickle files are never read).
        dtype: parameter dtype.

    Returns:
        ``(config, model)``.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``*.safetensors`` is missing.
        ValueError: invalid JSON, a missing or wrongly typed config key, an unsupported
            architecture/config (naming the folder, the file and the key), or missing /
            mis-shaped tensors (named).
    """
    _, config = read_lm_config(path, CAUSAL_LM_ARCHITECTURES.values(), loader="load_lm")
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0), dtype=dtype))
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return config, load_weights(abstract, path, dtype, ignore, loader="load_lm")


def save_lm(path: str | pathlib.Path, config: LMConfig, model: LM) -> None:
    """Saves ``config.json`` + ``model.safetensors`` loadable by ``AutoModelForCausalLM``."""
    save_weights(model, path, config.to_hf_dict())

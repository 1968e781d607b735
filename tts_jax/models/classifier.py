"""Small image classifiers (Flax NNX) used as verifiers and evaluators, with a safetensors layout.

Two architectures with deliberately different inductive biases, so that a held-out evaluator does
not share the steering verifier's blind spots (Ma et al. 2025 report held-out verifiers for this
reason):

- ``"cnn"``: 3x3 convolutions (GELU), 2x2 average pooling after every stage but the first, a dense
  feature layer, a linear head.
- ``"mlp"``: flattened pixels through dense GELU layers, a dense feature layer, a linear head.

Both return ``(logits [N, num_classes], features [N, features])``; ``features`` are the penultimate
activations (used for Frechet distances). Inputs are NCHW ``[N, C, H, W]`` images.

A checkpoint is a folder with ``config.json`` (the :class:`ClassifierConfig` fields) and
``model.safetensors`` (one float32 tensor per parameter, named by its path, e.g.
``convs.0.kernel``; kernels in Flax layout: conv ``[kh, kw, in, out]``, dense ``[in, out]``: the
:data:`~tts_jax.models.checkpoint.IDENTITY` layout), read and written by
:mod:`tts_jax.models.checkpoint` (docs/design.md, "Models we ship").

Precision: a module built or loaded with ``dtype=jnp.bfloat16`` holds bfloat16 parameters and
computes in bfloat16; its outputs (logits and features) are returned in float32, so rewards
built on them (log-probabilities, distances) are computed in float32 (docs/precision.md).
Checkpoints are stored in float32 whatever the dtype they are loaded in.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from tts_jax.models import checkpoint

Array = jax.Array
CONFIG_NAME = checkpoint.CONFIG_NAME
WEIGHTS_NAME = checkpoint.WEIGHTS_NAME
ARCHITECTURES = ("cnn", "mlp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Architecture of a classifier (hashable: a static argument under jit).

    Attributes:
        architecture: ``"cnn"`` or ``"mlp"``.
        hidden: ``"cnn"``: output channels of each conv stage; ``"mlp"``: widths of the hidden
            dense layers before the feature layer.
        features: width of the penultimate (feature) layer.
        num_classes: number of logits.
        image_shape: ``(C, H, W)`` of one input image.
    """

    architecture: str
    hidden: tuple[int, ...]
    features: int
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}, expected one of {ARCHITECTURES}"
            )
        if not self.hidden or min(self.hidden) < 1 or self.features < 1 or self.num_classes < 2:
            raise ValueError(f"layer widths must be positive (and num_classes >= 2): {self}")
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        factor = 2 ** (len(self.hidden) - 1)
        _, h, w = self.image_shape
        if self.architecture == "cnn" and (h % factor or w % factor):
            raise ValueError(
                f"a cnn with {len(self.hidden)} stages pools by {factor}; image_shape "
                f"{self.image_shape} is not divisible"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}; expected {sorted(fields)}")
        return cls(**d)


def _outputs(logits: Array, features: Array) -> tuple[Array, Array]:
    """The module outputs in float32 (computed in the module dtype)."""
    return logits.astype(jnp.float32), features.astype(jnp.float32)


class CNN(nnx.Module):
    """Conv stages -> flatten -> dense features -> logits (see module docstring)."""

    def __init__(self, config: ClassifierConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        c, h, w = config.image_shape
        widths = (c, *config.hidden)
        pairs = zip(widths[:-1], widths[1:], strict=True)
        typed = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", **typed) for a, b in pairs])
        factor = 2 ** (len(config.hidden) - 1)
        pooled = (h // factor) * (w // factor)
        self.feature = nnx.Linear(pooled * config.hidden[-1], config.features, **typed)
        self.head = nnx.Linear(config.features, config.num_classes, **typed)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """``x [N, C, H, W]`` (any float dtype) -> float32 ``(logits, features)``."""
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(self.head.param_dtype)  # NCHW -> NHWC
        for i, conv in enumerate(self.convs):
            if i > 0:
                h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
            h = nnx.gelu(conv(h))
        features = nnx.gelu(self.feature(h.reshape(h.shape[0], -1)))
        return _outputs(self.head(features), features)


class MLP(nnx.Module):
    """Flatten -> dense GELU layers -> dense features -> logits (see module docstring)."""

    def __init__(self, config: ClassifierConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        widths = (math.prod(config.image_shape), *config.hidden)
        pairs = zip(widths[:-1], widths[1:], strict=True)
        typed = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(a, b, **typed) for a, b in pairs])
        self.feature = nnx.Linear(widths[-1], config.features, **typed)
        self.head = nnx.Linear(config.features, config.num_classes, **typed)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """``x [N, C, H, W]`` (any float dtype) -> float32 ``(logits, features)``."""
        h = x.reshape(x.shape[0], -1).astype(self.head.param_dtype)
        for layer in self.layers:
            h = nnx.gelu(layer(h))
        features = nnx.gelu(self.feature(h))
        return _outputs(self.head(features), features)


def build_module(config: ClassifierConfig, seed: int = 0, *, dtype: Any = jnp.float32) -> CNN | MLP:
    """A freshly initialized NNX module for ``config`` (parameters and compute in ``dtype``)."""
    cls = CNN if config.architecture == "cnn" else MLP
    return cls(config, dtype=dtype, rngs=nnx.Rngs(seed))


@struct.dataclass
class Classifier:
    """A classifier as a pytree: weights are dynamic leaves, architecture is static.

    Pass it as an argument to jitted functions (never close over it), so one compiled program
    serves any weights.

    Attributes:
        params: nested dict of weight arrays in the module dtype (``nnx.to_pure_dict`` layout).
        graphdef: the NNX graph definition (static).
        config: the architecture (static).
    """

    params: dict
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    config: ClassifierConfig = struct.field(pytree_node=False)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        return apply_classifier(self.graphdef, self.params, x)


def apply_classifier(graphdef: nnx.GraphDef, params: dict, x: Array) -> tuple[Array, Array]:
    """Pure forward pass, jit-safe with ``params`` as an argument.

    Args:
        graphdef: from :func:`flax.nnx.split` of a :class:`CNN` / :class:`MLP` (static).
        params: nested dict of weights.
        x: ``Float[N, C, H, W]`` images.

    Returns:
        ``(logits [N, num_classes], features [N, features])``.
    """
    return nnx.merge(graphdef, params)(x)


def to_classifier(config: ClassifierConfig, module: CNN | MLP) -> Classifier:
    """Split an NNX module into a :class:`Classifier` pytree."""
    graphdef, state = nnx.split(module)
    return Classifier(nnx.to_pure_dict(state), graphdef, config)


def save_classifier(path: str | Path, config: ClassifierConfig, model: CNN | MLP) -> None:
    """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (created)."""
    tensors = checkpoint.export_params(model, checkpoint.IDENTITY, np.float32)
    checkpoint.save_folder(path, config.to_dict(), tensors, WEIGHTS_NAME)


def load_classifier(
    path: str | Path, *, loader: str = "load_classifier", dtype: Any = jnp.float32
) -> Classifier:
    """Load a folder written by :func:`save_classifier`.

    Args:
        path: the checkpoint folder (``config.json`` + ``model.safetensors``).
        loader: the name the error messages start with.
        dtype: parameter and compute dtype (the float32 tensors are cast to it; the outputs
            stay float32).

    Returns:
        :class:`Classifier` with weights in ``dtype``.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``model.safetensors`` is missing.
        ValueError: the config is not valid JSON, lacks a key, has a wrongly typed value or names
            unknown fields (naming the folder, the file and the key); tensors are missing,
            unexpected, of the wrong shape, or not float32 (all named).
    """
    config = checkpoint.read_config(
        path, loader, ClassifierConfig.from_dict, schema=ClassifierConfig
    )
    tensors = checkpoint.read_tensors(path, loader, WEIGHTS_NAME)
    abstract = nnx.eval_shape(lambda: build_module(config))
    module = checkpoint.load_params(abstract, tensors, checkpoint.IDENTITY, strict_dtype=True)
    if jnp.dtype(dtype) != jnp.float32:  # the file is checked as float32, then cast
        typed = nnx.eval_shape(lambda: build_module(config, dtype=dtype))
        state = jax.tree.map(lambda v: v.astype(dtype), nnx.state(module))
        module = nnx.merge(nnx.graphdef(typed), state)
    return to_classifier(config, module)

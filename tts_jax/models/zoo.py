"""The asset registry: the embedded checkpoints (``tts_jax/assets/<name>``), found by name.

This is the one place that knows where the shipped checkpoints live (:data:`ASSETS_DIR`), which
files each holds and which command builds it (:data:`EMBEDDED`); every loader of an embedded asset
asks it (:func:`asset_dir`, :func:`asset_path`, :func:`require_asset`). Every asset is trained by
``tts-jax train`` (:mod:`tts_jax.app.training`) and shipped in a standard folder layout
(diffusers / transformers ``config.json`` + safetensors, read by :mod:`tts_jax.models.checkpoint`),
so nothing is downloaded at run time (docs/design.md, "Models we ship"):

- ``digits-dit``: class-conditional flow-matching DiT on the 8x8 digits (Lipman et al. 2023 flow
  matching on the linear path; Peebles & Xie 2023 DiT), usable conditionally, unconditionally and
  with classifier-free guidance. Samples ``[N, 1, 8, 8]`` in about ``[-1, 1]``.
- ``digits-verifier`` / ``digits-heldout``: the steering verifier (CNN) and the held-out evaluator
  (MLP) digit classifiers, trained on disjoint halves of the digits.
- ``arith-lm`` / ``arith-prm``: the arithmetic policy LM and its process reward model (Qwen2
  layout).

Loading an asset whose weights have not been built raises :class:`AssetNotBuiltError` naming the
folder, the missing file and the script that builds it; a broken config or weights file raises
the model loader's error, which names the folder, the file and the key or tensor.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path
from typing import Any

from tts_jax.models.base import FlowModel
from tts_jax.models.checkpoint import CheckpointNotFoundError, require_file

# The model loaders are imported where they are used, so that looking an asset up (e.g. from
# :mod:`tts_jax.rewards.classifier` or the app's task modules) loads no network code.

# Where the embedded assets live (a module attribute, so tests can point it elsewhere).
ASSETS_DIR = Path(str(files("tts_jax") / "assets"))


class AssetNotBuiltError(CheckpointNotFoundError):
    """An embedded asset is registered but its files are not in this installation."""


@dataclasses.dataclass(frozen=True)
class EmbeddedAsset:
    """One shipped checkpoint folder.

    Attributes:
        name: folder name under ``tts_jax/assets``.
        kind: ``"flow"``, ``"classifier"``, ``"lm"`` or ``"reward-lm"``.
        files: files that must be present for the asset to load.
        script: the command that trains it (``--install`` exports it into the assets).
        description: one line for listings.
    """

    name: str
    kind: str
    files: tuple[str, ...]
    script: str
    description: str


EMBEDDED: dict[str, EmbeddedAsset] = {
    a.name: a
    for a in (
        EmbeddedAsset(
            "digits-dit",
            "flow",
            ("config.json", "diffusion_pytorch_model.safetensors"),
            "tts-jax train digits-dit",
            "class-conditional flow-matching DiT on 8x8 digits (null label = unconditional)",
        ),
        EmbeddedAsset(
            "digits-verifier",
            "classifier",
            ("config.json", "model.safetensors"),
            "tts-jax train digits-classifiers",
            "CNN digit classifier on split part a: the steering verifier",
        ),
        EmbeddedAsset(
            "digits-heldout",
            "classifier",
            ("config.json", "model.safetensors"),
            "tts-jax train digits-classifiers",
            "MLP digit classifier on split part b: the held-out evaluator",
        ),
        EmbeddedAsset(
            "arith-lm",
            "lm",
            ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
            "tts-jax train arith-lm",
            "Qwen2-layout policy LM for multi-step arithmetic with worked steps",
        ),
        EmbeddedAsset(
            "arith-prm",
            "reward-lm",
            ("config.json", "model.safetensors"),
            "tts-jax train arith-prm",
            "Qwen2-layout process reward model for the arithmetic policy",
        ),
    )
}


def _asset(name: str) -> EmbeddedAsset:
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded asset {name!r}; known: {sorted(EMBEDDED)}")
    return EMBEDDED[name]


def asset_dir(name: str) -> Path:
    """The folder of embedded asset ``name`` under :data:`ASSETS_DIR` (not checked to exist).

    Raises:
        KeyError: ``name`` is not a registered asset.
    """
    return ASSETS_DIR / _asset(name).name


def require_asset(folder: str | Path, name: str, loader: str) -> Path:
    """``folder`` as a :class:`Path`, checked to hold every file asset ``name`` is registered
    with (``folder`` may be the embedded copy or another one, e.g. a training output).

    Raises:
        KeyError: ``name`` is not a registered asset.
        CheckpointNotFoundError: the folder or one of the files is missing (names the loader,
            the folder, the file and the command that builds the asset).
    """
    asset = _asset(name)
    folder = Path(folder)
    for file in asset.files:
        require_file(folder, file, loader, hint=f"run `{asset.script} --install`")
    return folder


def asset_path(name: str) -> Path:
    """The folder of embedded asset ``name``, checked to hold all of its files.

    Raises:
        KeyError: ``name`` is not a registered asset.
        AssetNotBuiltError: the asset's folder or one of its files is missing (names the folder,
            the file and the script that builds them).
    """
    try:
        return require_asset(asset_dir(name), name, f"embedded asset {name!r} is not built")
    except CheckpointNotFoundError as e:
        raise AssetNotBuiltError(str(e)) from None


def load_digits_flow(guided: bool = False, guidance: float = 1.0) -> FlowModel:
    """The embedded digits DiT as a velocity :class:`FlowModel` on the linear path.

    Args:
        guided: evaluate classifier-free guidance when labels are given (a ``2N`` batch).
        guidance: initial guidance scale ``w`` (change without recompiling via
            :func:`tts_jax.models.wrappers.with_guidance`).

    Returns:
        ``FlowModel`` with ``sample_shape (1, 8, 8)``; ``cond`` is ``Int[N]`` labels in ``0..9``,
        the null label ``10``, or ``None`` for unconditional sampling.
    """
    from tts_jax.models.dit import load_dit
    from tts_jax.models.wrappers import velocity_dit_flow

    _, dit = load_dit(asset_path("digits-dit"))
    return velocity_dit_flow(dit, guided=guided, guidance=guidance)


def load_embedded(name: str, **kwargs: Any) -> Any:
    """Load any embedded asset by name with its kind's loader.

    Returns:
        ``"flow"``: :class:`FlowModel` (``kwargs``: ``guided``, ``guidance`` as in
        :func:`load_digits_flow`);
        ``"classifier"``: :class:`~tts_jax.models.classifier.Classifier`;
        ``"lm"``: ``(LMConfig, LM)``;
        ``"reward-lm"``: ``(LMConfig, RewardModel)``.
    """
    path = asset_path(name)
    kind = EMBEDDED[name].kind
    if kind == "flow":
        from tts_jax.models.dit import load_dit
        from tts_jax.models.wrappers import velocity_dit_flow

        return velocity_dit_flow(load_dit(path)[1], **kwargs)
    if kind == "classifier":
        from tts_jax.models.classifier import load_classifier

        return load_classifier(path)
    if kind == "lm":
        from tts_jax.models.lm import load_lm

        return load_lm(path, **kwargs)
    from tts_jax.models.lm_reward import load_reward_model

    return load_reward_model(path, **kwargs)

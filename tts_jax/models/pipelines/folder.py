"""Which files make up a diffusers text-to-image pipeline folder (SD3 / SD3.5, FLUX).

A pipeline folder, as ``DiffusionPipeline.save_pretrained`` writes it and the hub's
``*-diffusers`` / ``FLUX.1-*`` repositories hold it, is ``model_index.json`` (``{"_class_name":
"StableDiffusion3Pipeline", "<component>": ["<library>", "<class>"], ...}``) plus one sub-folder
per component: ``transformer/``, ``vae/``, ``text_encoder*/`` (``config.json`` + safetensors),
``tokenizer*/`` and ``scheduler/``.

:func:`read_pipeline_folder` checks such a folder without reading any weights and describes it
(:class:`PipelineFolder`); :func:`find_component_weights` locates one component's safetensors.
:func:`resolve_pipeline` turns a local folder or a hub id into a local folder (downloading only
configs, tokenizer files and safetensors). Every problem raises a named error (subclasses of
:mod:`tts_jax.models.checkpoint`'s) whose message names the folder and says what to do.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

from tts_jax.models import checkpoint

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_KINDS: dict[str, Literal["sd3", "flux"]] = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
"""Supported ``_class_name`` values of ``model_index.json`` and their kind."""
COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd3": (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ),
    "flux": (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ),
}
"""The components each kind reads (``image_encoder`` / ``feature_extractor``, IP adapters, are
ignored)."""
OPTIONAL_COMPONENTS = {"sd3": ("text_encoder_3", "tokenizer_3")}
"""Components ``model_index.json`` may set to ``[null, null]``: SD3 runs without T5 (the
pipeline then uses zeros for the T5 part of the prompt embedding)."""
WEIGHTS_NAMES = {
    "transformers": checkpoint.WEIGHTS_NAME,
    "diffusers": checkpoint.DIFFUSERS_WEIGHTS_NAME,
}
"""Standard weights file name per component library (``model_index.json``'s first entry)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ALLOW_PATTERNS = (MODEL_INDEX_NAME, "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")
"""What :func:`resolve_pipeline` downloads: the index and the components' configs, safetensors,
tokenizer files (``merges.txt``, ``spiece.model``). Not the single-file checkpoints at the root
of some repositories (``flux1-dev.safetensors``), nor pickles."""

_LOADER = "read_pipeline_folder"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CONVERT = (
    "only safetensors are read; convert with diffusers / transformers: "
    "X.from_pretrained(folder).save_pretrained(folder, safe_serialization=True) "
    "(or the whole pipeline: DiffusionPipeline.from_pretrained(folder)"
    ".save_pretrained(new_folder, safe_serialization=True))"
)


class NotAPipelineFolderError(checkpoint.CheckpointNotFoundError):
    """A folder without ``model_index.json``: not a diffusers pipeline folder."""


class UnsupportedPipelineError(checkpoint.CheckpointConfigError):
    """``model_index.json`` names a pipeline class other than the supported ones."""


class MissingComponentError(checkpoint.CheckpointNotFoundError):
    """A component the pipeline needs is not listed in ``model_index.json`` or has no
    sub-folder."""


class PickleWeightsError(checkpoint.CheckpointError):
    """A component's weights exist only as pickle files (``.bin``, ``.pt``, ...)."""


class HubUnreachableError(checkpoint.CheckpointNotFoundError):
    """A hub id was given and the Hugging Face hub could not provide it (offline, no access)."""


@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    """A checked pipeline folder (nothing loaded yet).

    Attributes:
        path: the pipeline folder.
        class_name: ``model_index.json``'s ``_class_name``.
        kind: ``"sd3"`` or ``"flux"``.
        transformer, vae, scheduler: component sub-folders.
        text_encoder, text_encoder_2, text_encoder_3: SD3: CLIP-L, CLIP-G (both
            ``CLIPTextModelWithProjection``), T5 (``None`` when the folder has none); FLUX:
            CLIP-L (``CLIPTextModel``), T5, ``None``.
        tokenizer, tokenizer_2, tokenizer_3: their tokenizers, likewise.
        classes: ``component -> (library, class name)`` as listed in ``model_index.json`` (the
            components read, present ones only).
        diffusers_version: ``model_index.json``'s ``_diffusers_version`` (or ``None``).
    """

    path: Path
    class_name: str
    kind: Literal["sd3", "flux"]
    transformer: Path
    vae: Path
    scheduler: Path
    text_encoder: Path
    text_encoder_2: Path
    tokenizer: Path
    tokenizer_2: Path
    text_encoder_3: Path | None = None
    tokenizer_3: Path | None = None
    classes: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    diffusers_version: str | None = None

    @property
    def text_encoders(self) -> tuple[Path, ...]:
        """The text encoder sub-folders present, in pipeline order."""
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return tuple(p for p in encoders if p is not None)


def _no_index_hint(folder: Path) -> str:
    names = {p.name for p in folder.iterdir()}
    hint = "not a diffusers pipeline folder"
    if checkpoint.CONFIG_NAME in names:
        return hint + "; it looks like a single model folder: pass the pipeline folder above it"
    if any(n.endswith(checkpoint.SAFETENSORS) for n in names):
        return hint + (
            "; single-file checkpoints (e.g. flux1-dev.safetensors) are not read: use the "
            "diffusers-format repository (model_index.json and sub-folders)"
        )
    return hint + " (expected what DiffusionPipeline.save_pretrained writes)"


def _component_entry(index: checkpoint.ConfigFile, name: str) -> tuple[str, str] | None:
    """``(library, class)`` of ``name`` in the index, ``None`` for ``[null, null]``."""
    entry = index.raw.get(name)
    if entry is None:
        return None
    ok = isinstance(entry, list) and len(entry) == 2
    if ok and entry[0] is None and entry[1] is None:
        return None
    if not (ok and all(isinstance(e, str) for e in entry)):
        raise checkpoint.CheckpointConfigError(
            f'{index.where}: "{name}" must be ["<library>", "<class>"] or [null, null], '
            f"got {entry!r}"
        )
    return entry[0], entry[1]


def find_component_weights(
    folder: str | Path, library: str = "diffusers", loader: str = _LOADER
) -> checkpoint.WeightFiles:
    """The safetensors of one component sub-folder (nothing read).

    Prefers the library's standard name (``model.safetensors`` for transformers,
    ``diffusion_pytorch_model.safetensors`` for diffusers) or its shards' index, else the
    folder's one index or every ``*.safetensors`` (see :func:`checkpoint.find_weights`).

    Raises:
        PickleWeightsError: the folder holds pickle weights and no safetensors (with how to
            convert).
        CheckpointNotFoundError: no weights at all (listing the folder).
    """
    folder = checkpoint.require_folder(folder, loader)
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(checkpoint.SAFETENSORS) for n in files):
        pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise PickleWeightsError(
                f"{loader}: {folder} holds only pickle weights ({', '.join(pickles)}); {_CONVERT}"
            )
    standard = WEIGHTS_NAMES.get(library, checkpoint.DIFFUSERS_WEIGHTS_NAME)
    if (folder / standard).is_file() or (folder / (standard + checkpoint.INDEX_SUFFIX)).is_file():
        return checkpoint.find_weights(folder, loader, standard)
    return checkpoint.find_weights(folder, loader, hint=f"expected {standard} or its shards")


def read_pipeline_folder(path: str | Path) -> PipelineFolder:
    """Checks a local pipeline folder and describes it.

    Args:
        path: a folder with ``model_index.json`` (see :func:`resolve_pipeline` for hub ids).

    Returns:
        :class:`PipelineFolder`.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist or is not a directory.
        NotAPipelineFolderError: no ``model_index.json`` (saying what the folder holds).
        CheckpointConfigError: ``model_index.json`` is not JSON or a component entry is not
            ``[library, class]``.
        UnsupportedPipelineError: ``_class_name`` is not one of :data:`PIPELINE_KINDS`.
        MissingComponentError: a needed component is not listed or its sub-folder is missing.
        PickleWeightsError: a model component has only pickle weights.
        CheckpointNotFoundError: a model component has no ``config.json`` or no weights.
    """
    folder = checkpoint.require_folder(path, _LOADER)
    if not (folder / MODEL_INDEX_NAME).is_file():
        try:
            checkpoint.require_file(folder, MODEL_INDEX_NAME, _LOADER, _no_index_hint(folder))
        except checkpoint.CheckpointNotFoundError as e:
            raise NotAPipelineFolderError(str(e)) from None
    index = checkpoint.read_config_file(folder, _LOADER, MODEL_INDEX_NAME)
    index.check({"_class_name": str, "_diffusers_version": str}, ("_class_name",))
    class_name = index.raw["_class_name"]
    if class_name not in PIPELINE_KINDS:
        raise UnsupportedPipelineError(
            f"{index.where}: pipeline class {class_name!r} is not supported; supported: "
            + ", ".join(PIPELINE_KINDS)
        )
    kind = PIPELINE_KINDS[class_name]
    optional = OPTIONAL_COMPONENTS.get(kind, ())
    classes: dict[str, tuple[str, str]] = {}
    paths: dict[str, Path | None] = {}
    for name in COMPONENTS[kind]:
        entry = _component_entry(index, name)
        if entry is None:
            if name in optional:
                paths[name] = None
                continue
            raise MissingComponentError(
                f"{index.where} lists no {name!r} component; a {class_name} needs "
                + ", ".join(c for c in COMPONENTS[kind] if c not in optional)
            )
        sub = folder / name
        if not sub.is_dir():
            raise MissingComponentError(
                f"{_LOADER}: pipeline folder {folder} has no {name}/ sub-folder, which "
                f"{MODEL_INDEX_NAME} lists as {entry[1]}; download the whole pipeline"
            )
        classes[name], paths[name] = entry, sub
        if name.startswith(("transformer", "vae", "text_encoder")):
            checkpoint.require_file(sub, checkpoint.CONFIG_NAME, _LOADER)
            find_component_weights(sub, entry[0])
    return PipelineFolder(
        path=folder,
        class_name=class_name,
        kind=kind,
        classes=classes,
        diffusers_version=index.raw.get("_diffusers_version"),
        **paths,
    )


def resolve_pipeline(
    path_or_hub_id: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local pipeline folder for a path or a hub id.

    An existing path is returned as is (:func:`read_pipeline_folder` checks it). Otherwise a
    string of the form ``owner/name`` is taken as a hub repository and fetched with
    ``huggingface_hub.snapshot_download`` (only :data:`HUB_ALLOW_PATTERNS`; a cached snapshot
    is used offline, ``HF_HUB_OFFLINE=1``).

    Args:
        path_or_hub_id: a folder, or a hub id such as ``"black-forest-labs/FLUX.1-schnell"``.
        revision: hub branch / tag / commit.
        cache_dir: hub cache (default: huggingface_hub's).

    Returns:
        The local folder.

    Raises:
        CheckpointNotFoundError: a path that does not exist and is not a hub id.
        HubUnreachableError: the download failed (offline, no network, unknown or gated
            repository: the cause is in the message), saying to pass a folder downloaded
            elsewhere.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_hub_id)
    if not _HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise checkpoint.CheckpointNotFoundError(
            f"resolve_pipeline: folder {path} does not exist (and {name!r} is not a hub id of the "
            "form owner/name)"
        )
    try:
        import huggingface_hub

        local = huggingface_hub.snapshot_download(
            name, revision=revision, cache_dir=cache_dir, allow_patterns=list(HUB_ALLOW_PATTERNS)
        )
    except Exception as e:  # offline, network, auth, unknown repo: all end the same way
        raise HubUnreachableError(
            f"resolve_pipeline: {name!r} is not a local folder and the Hugging Face hub could not "
            f"provide it ({type(e).__name__}: {e}); the hub is unreachable from here: download the "
            f"pipeline where it is reachable (huggingface-cli download {name} --local-dir DIR) "
            "and pass DIR"
        ) from e
    return Path(local)

"""Former home of the checkpoint checks; they now live in :mod:`tts_jax.models.checkpoint`.

Every name stays importable from here for existing callers (e.g. :mod:`tts_jax.models.wrappers`);
new code imports :mod:`tts_jax.models.checkpoint`, the one checkpoint IO module
(docs/design.md, "Models we ship").
"""

from tts_jax.models.checkpoint import (
    CONFIG_NAME,
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigFile,
    check_config,
    field_types,
    read_config_file,
    read_json_file,
    require_file,
    require_files,
    require_folder,
    required_fields,
    safetensors_errors,
)

__all__ = [
    "CONFIG_NAME",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigFile",
    "check_config",
    "field_types",
    "read_config_file",
    "read_json_file",
    "require_file",
    "require_files",
    "require_folder",
    "required_fields",
    "safetensors_errors",
]

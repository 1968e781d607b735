"""Text-to-image pipelines (SD3 / SD3.5, FLUX) read from local diffusers folders.

Submodules: :mod:`~tts_jax.models.pipelines.folder` (which files make up a pipeline folder) and
:mod:`~tts_jax.models.pipelines.schedule` (the flow-matching time grid the diffusers pipelines
use).
"""

"""Text-to-image (SD3 / SD3.5, FLUX) and text-to-video (Wan 2.1) pipelines read from local
diffusers folders.

Submodules: :mod:`~tts_jax.models.pipelines.folder` (which files make up a pipeline folder),
:mod:`~tts_jax.models.pipelines.schedule` (the flow-matching time grid the diffusers pipelines
use), :mod:`~tts_jax.models.pipelines.prompts` (tokenizers and text encoders) and
:mod:`~tts_jax.models.pipelines.text_to_image` (the pipeline as a prompt-conditioned flow model:
:func:`load_text_to_image`) and :mod:`~tts_jax.models.pipelines.text_to_video` (Wan 2.1
text-to-video with the same interface: :func:`load_text_to_video`).
"""

from tts_jax.models.pipelines.prompts import TextCondition
from tts_jax.models.pipelines.text_to_image import (
    TextToImagePipeline,
    decode_latents,
    decoded_reward,
    load_text_to_image,
    with_guidance,
)
from tts_jax.models.pipelines.text_to_video import (
    TextToVideoPipeline,
    decoded_video_reward,
    load_text_to_video,
)

__all__ = [
    "TextCondition",
    "TextToImagePipeline",
    "TextToVideoPipeline",
    "decode_latents",
    "decoded_reward",
    "decoded_video_reward",
    "load_text_to_image",
    "load_text_to_video",
    "with_guidance",
]

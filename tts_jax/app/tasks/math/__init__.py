"""The math task: MATH500-style problems for LLM steering with a Qwen2.5-Math policy and
Qwen2.5-Math-PRM (the setup of Puri et al. 2025), one job per module:

- :mod:`~tts_jax.app.tasks.math.prompting`: chat-template prompts (:func:`build_prompt`) and the
  policy's ``generation_config.json`` (:func:`read_generation_settings`);
- :mod:`~tts_jax.app.tasks.math.prm_format`: steps (blank-line separated) and the PRM input
  (steps followed by ``<extra_0>``; :func:`prm_conversation`, :func:`policy_to_prm`);
- :mod:`~tts_jax.app.tasks.math.answers`: ``\\boxed{}`` extraction, equivalence with math-verify
  and votes over equivalence classes (selection rules of :mod:`tts_jax.samplers.lm.answers`);
- :mod:`~tts_jax.app.tasks.math.data`: problems from JSONL, parquet or a ``datasets`` folder.
"""

from tts_jax.app.tasks.math.answers import (
    SELECTIONS,
    EquivalenceVote,
    completion_answer,
    extract_boxed,
    is_correct,
    is_equivalent,
    majority,
    weighted,
)
from tts_jax.app.tasks.math.data import MathProblem, load_problems
from tts_jax.app.tasks.math.prm_format import (
    PRM_STEP_TOKEN,
    STEP_SEPARATOR,
    PRMInput,
    policy_to_prm,
    prm_conversation,
    prm_host_fn,
    separator_token_ids,
    split_steps,
    step_rewards,
    step_separator_id,
)
from tts_jax.app.tasks.math.prompting import (
    QWEN_MATH_SYSTEM,
    GenerationSettings,
    MissingChatTemplateError,
    build_prompt,
    load_tokenizer,
    read_generation_settings,
)

__all__ = [
    "PRM_STEP_TOKEN",
    "QWEN_MATH_SYSTEM",
    "SELECTIONS",
    "STEP_SEPARATOR",
    "EquivalenceVote",
    "GenerationSettings",
    "MathProblem",
    "MissingChatTemplateError",
    "PRMInput",
    "build_prompt",
    "completion_answer",
    "extract_boxed",
    "is_correct",
    "is_equivalent",
    "load_problems",
    "load_tokenizer",
    "majority",
    "policy_to_prm",
    "prm_conversation",
    "prm_host_fn",
    "read_generation_settings",
    "separator_token_ids",
    "split_steps",
    "step_rewards",
    "step_separator_id",
    "weighted",
]

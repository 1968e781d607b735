"""The embedded arithmetic policy LM and process reward model, and how to load them.

Both are trained by our own scripts (``tts-jax train arith-lm``,
``tts-jax train arith-prm``) on :data:`ARITH_TASK` problems and shipped in the transformers
layout, so they also load with ``AutoModelForCausalLM`` / ``AutoTokenizer``:

- ``assets/arith-lm/``: a small Qwen2-style policy (stored as ``LlamaForCausalLM`` with attention
  biases, see :mod:`tts_jax.app.training.arith_lm`) plus the task tokenizer;
- ``assets/arith-prm/``: a ``Qwen2ForProcessRewardModel`` (Zhang et al. 2025 layout) whose class-1
  probability at a step-end token (newline or EOS) is the probability that the solution prefix up
  to it is still correct (Puri et al. 2025 score partial solutions this way). Read at the EOS
  after the answer line it is the outcome reward (ORM) of a finished solution.

The held-out problems are ``make_splits(..., N_EVAL_PROBLEMS, ARITH_TASK)``'s eval split (seed
``EVAL_SEED``), which the training scripts exclude.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from tts_jax.app.tasks.arith_data import EVAL_SEED
from tts_jax.app.tasks.arith_tokenizer import ARITH_LM_DIR, ArithTokenizer
from tts_jax.app.tasks.arithmetic import ArithConfig, Problem, generate_problems
from tts_jax.models.lm import LM, LMConfig, generate, load_lm
from tts_jax.models.lm_reward import RewardModel, load_reward_model
from tts_jax.models.zoo import asset_dir, require_asset

__all__ = [
    "ARITH_LM_DIR",
    "ARITH_PRM_DIR",
    "ARITH_TASK",
    "MAX_NEW_TOKENS",
    "N_EVAL_PROBLEMS",
    "PROMPT_WIDTH",
    "encode_prompts",
    "eval_problems",
    "load_arith_policy",
    "load_arith_prm",
    "sample_solutions",
]

ARITH_PRM_DIR = asset_dir("arith-prm")  # ARITH_LM_DIR is asset_dir("arith-lm")
# Difficulty the embedded models are trained on and evaluated with.
ARITH_TASK = ArithConfig(min_ops=2, max_ops=5, max_operand=20, mul_prob=0.1, max_value=99)
# Size of the held-out split every training script excludes (eval_problems(n) for n <= this).
N_EVAL_PROBLEMS = 500
# Fixed shapes for sampling (one compiled program): padded prompt width and the token budget of
# a completion (a 5-step solution with its answer line and EOS takes about 50 tokens).
PROMPT_WIDTH = 32
MAX_NEW_TOKENS = 64


def eval_problems(n: int) -> list[Problem]:
    """The first ``n`` held-out problems (never seen in training).

    Args:
        n: how many, at most :data:`N_EVAL_PROBLEMS`.

    Returns:
        ``n`` problems of difficulty :data:`ARITH_TASK`.
    """
    if not 0 < n <= N_EVAL_PROBLEMS:
        raise ValueError(f"n must be in [1, {N_EVAL_PROBLEMS}], got {n}")
    return generate_problems(n, EVAL_SEED, ARITH_TASK)


def load_arith_policy(
    path: str | pathlib.Path = ARITH_LM_DIR,
) -> tuple[LMConfig, LM, ArithTokenizer]:
    """Loads the arithmetic policy LM and its tokenizer.

    Args:
        path: folder with ``config.json``, ``model.safetensors`` and the tokenizer files.

    Returns:
        ``(config, model, tokenizer)``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (naming the folder, the
            file and the training script).
        ValueError: a broken config (naming the folder, the file and the key) or weights that
            do not match it (naming the tensor).
    """
    path = require_asset(path, "arith-lm", "load_arith_policy")
    config, model = load_lm(path)
    return config, model, ArithTokenizer.load(path)


def load_arith_prm(path: str | pathlib.Path = ARITH_PRM_DIR) -> tuple[LMConfig, RewardModel]:
    """Loads the arithmetic process reward model (use the policy's tokenizer).

    Args:
        path: ``Qwen2ForProcessRewardModel`` folder.

    Returns:
        ``(config, prm)``; score steps with :func:`tts_jax.models.lm_reward.prm_scores` at
        ``ArithTokenizer.step_end_mask`` positions.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (naming the folder, the
            file and the training script).
        ValueError: a broken config (naming the folder, the file and the key) or weights that
            do not match it (naming the tensor).
    """
    path = require_asset(path, "arith-prm", "load_arith_prm")
    return load_reward_model(path)


def encode_prompts(
    tokenizer: ArithTokenizer, problems: Sequence[Problem], width: int = PROMPT_WIDTH
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids and their lengths.

    Args:
        tokenizer: the task tokenizer.
        problems: ``N`` problems.
        width: padded width ``P``.

    Returns:
        ``(ids int32[N, P], lengths int32[N])``.

    Raises:
        ValueError: a prompt is longer than ``width``.
    """
    rows = [tokenizer.encode(p.prompt) for p in problems]
    longest = max(len(r) for r in rows)
    if longest > width:
        raise ValueError(f"a prompt has {longest} tokens, more than width={width}")
    ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, np.array([len(r) for r in rows], np.int32)


def sample_solutions(
    model: LM,
    tokenizer: ArithTokenizer,
    problems: Sequence[Problem],
    key: jax.Array,
    *,
    temperature: float | jax.Array,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> np.ndarray:
    """One completion per problem from the policy (stops at EOS).

    Args:
        model: the policy.
        tokenizer: its tokenizer.
        problems: ``N`` problems (repeat a problem to draw several samples of it).
        key: PRNG key.
        temperature: scalar or ``[N]``; 0 is greedy.
        max_new_tokens: token budget per completion.

    Returns:
        ``int32[N, max_new_tokens]`` completion ids (EOS included, PAD after it); decode with
        ``tokenizer.decode`` and judge with :mod:`tts_jax.app.tasks.arithmetic`.
    """
    ids, lengths = encode_prompts(tokenizer, problems)
    out = generate(
        model,
        ids,
        key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_id,
        prompt_lengths=lengths,
        pad_id=tokenizer.pad_id,
    )
    return np.asarray(out.tokens)

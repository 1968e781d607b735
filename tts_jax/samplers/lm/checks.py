"""Host-side checks of the LM samplers' arguments and results (before and after the jitted run).

Every error names the argument and the value it got (docs/policies.md).
"""

from __future__ import annotations

import numpy as np


def check_budget(
    num_particles: int, max_new_tokens: int, max_steps: int, max_step_tokens: int
) -> None:
    """Reject empty budgets with a clear error (host side).

    Raises:
        ValueError: any of the sizes below 1.
    """
    sizes = {
        "num_particles": num_particles,
        "max_new_tokens": max_new_tokens,
        "max_steps": max_steps,
        "max_step_tokens": max_step_tokens,
    }
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"empty budget: {bad} (every size must be >= 1)")


def check_prompt(prompt) -> np.ndarray:
    """The prompt as ``int32[P]`` with ``P >= 1`` (host side)."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 1 or prompt.shape[0] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt must be a non-empty int vector [P], got {prompt.dtype} {prompt.shape}"
        )
    return prompt.astype(np.int32)


def check_prompt_length(prompt: np.ndarray, prompt_length: int | None) -> np.ndarray:
    """The real length of a right-padded prompt as an int32 scalar (default: all of it).

    Raises:
        ValueError: ``prompt_length`` outside ``[1, P]``.
    """
    p = prompt.shape[0]
    length = p if prompt_length is None else int(prompt_length)
    if not 1 <= length <= p:
        raise ValueError(f"prompt_length must lie in [1, {p}], got {prompt_length}")
    return np.int32(length)


def check_nan(num_nan: int, method: str, nan_policy: str) -> None:
    """Raise for NaN scores unless ``nan_policy == "drop"`` (NaN-scored particles got weight 0)."""
    if nan_policy not in ("raise", "drop"):
        raise ValueError(f"nan_policy must be 'raise' or 'drop', got {nan_policy!r}")
    if num_nan and nan_policy == "raise":
        raise ValueError(
            f"{method}: the scorer returned NaN for {num_nan} particle evaluations "
            "(pass nan_policy='drop' to give such particles zero weight instead)"
        )

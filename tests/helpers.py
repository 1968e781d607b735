"""Statistical assertions shared by the tests: tolerances come from the sample size."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import gmm as G
from tts_jax.models import lm


def weighted_moments(values: np.ndarray, weights: np.ndarray | None = None):
    """Weighted mean of ``values [N, ...]`` and its standard error (Kish effective sample size)."""
    values = np.asarray(values, np.float64)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, values, axes=1)
    var = np.tensordot(w, (values - mean) ** 2, axes=1)
    n_eff = 1.0 / np.sum(w**2)
    return mean, np.sqrt(var / n_eff)


def gmm_statistics(gmm: G.GMM, x) -> np.ndarray:
    """Per-sample statistics whose exact expectations under ``gmm`` are known in closed form:
    ``x`` (-> mean), ``x x'`` upper triangle (-> second moments), responsibilities ``p(k|x)``
    (-> mixture weights)."""
    x = jnp.asarray(x)
    d = x.shape[-1]
    iu = np.triu_indices(d)
    outer = (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]
    resp = jnp.exp(G.component_log_posterior(gmm, x))
    return np.concatenate([np.asarray(x), np.asarray(outer), np.asarray(resp)], axis=1)


def gmm_expected_statistics(gmm: G.GMM) -> np.ndarray:
    d = gmm.dim
    iu = np.triu_indices(d)
    m = np.asarray(G.mean(gmm))
    second = np.asarray(G.covariance(gmm)) + np.outer(m, m)
    return np.concatenate([m, second[iu], np.asarray(gmm.weights)])


def assert_matches_gmm(gmm: G.GMM, x, weights=None, num_se: float = 5.0, slack: float = 0.0):
    """Mean, second moments and component proportions of (weighted) samples ``x`` match ``gmm``
    within ``num_se`` standard errors (plus an optional absolute ``slack`` for discretization)."""
    est, se = weighted_moments(gmm_statistics(gmm, x), weights)
    expected = gmm_expected_statistics(gmm)
    err = np.abs(est - expected)
    bound = num_se * se + slack
    assert (err <= bound).all(), (
        f"statistics {est} vs exact {expected}: error {err} > bound {bound}"
    )


def run_on_host_devices(script: str, num_devices: int, marker: str) -> None:
    """Run ``script`` in a fresh Python with ``num_devices`` CPU devices (the XLA flag must be set
    before jax starts) from the repository root; assert it succeeds and prints ``marker``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert marker in out.stdout


# --------------------------------------------------------------------------- pinned digests
# Results were pinned (sha256 of every field) before issue 16 gave all samplers one Result type.
# These views rebuild the layout the digests were taken on from the new fields, so the pins
# keep proving that the numbers did not change: the same arrays, only renamed.
_STEP_FIELDS = ("ess", "resampled", "ancestors", "unique_ancestors")


def _legacy_info(info, nan_name: str, inf_name: str | None) -> dict:
    old = {k: getattr(info, k) for k in _STEP_FIELDS if np.shape(info.ess)[0] > 0}
    old.update({k: v for k, v in info.extra.items() if k != "lm_calls"})
    old[nan_name] = info.num_nan
    if inf_name is not None:
        old[inf_name] = info.num_inf
    if info.held_out:
        old["held_out"] = info.held_out
    return old


def legacy_image_fields(result, search: bool = False) -> dict:
    """The fields of an image sampler's result as the pre-issue-16 ``SampleResult._asdict()``
    (``info`` a dict with ``num_nan_rewards`` / ``num_inf_rewards``; a search's ``held_out``)."""
    info = _legacy_info(result.info, "num_nan_rewards", "num_inf_rewards")
    if search:
        info.setdefault("held_out", {})
    return {
        "samples": result.samples,
        "rewards": result.rewards,
        "log_weights": result.log_weights,
        "best": result.best,
        "nfe": result.cost.nfe,
        "reward_calls": result.cost.reward_calls,
        "log_evidence": result.log_evidence,
        "info": info,
    }


class LegacyBudget(NamedTuple):
    tokens: Any
    nfe: Any
    lm_calls: Any
    prm_calls: Any


class LegacyLMResult(NamedTuple):
    tokens: Any
    lengths: Any
    finished: Any
    scores: Any
    log_weights: Any
    best: Any
    log_evidence: Any
    all_dead: Any
    budget: LegacyBudget
    info: dict


def legacy_lm_result(result) -> LegacyLMResult:
    """An LM sampler's result in the pre-issue-16 ``LMResult`` layout."""
    cost = result.cost
    return LegacyLMResult(
        *result.samples,
        result.rewards,
        result.log_weights,
        result.best,
        result.log_evidence,
        result.all_dead,
        LegacyBudget(cost.tokens, cost.nfe, result.info.extra["lm_calls"], cost.reward_calls),
        _legacy_info(result.info, "num_nan", None),
    )


# --------------------------------------------------------------------------- tiny language models
# The LM sampler tests share one tiny random Qwen2 (vocabulary 5, token 0 = EOS), its exact
# enumeration (tests/lm_exact.py) and the digests the kernel ports were pinned with.
VOCAB, EOS = 5, 0
PINNED_JAX = "0.10.2"


def random_module(make, seed: int):
    """``make()``'s module with N(0, 0.5^2) weights around identity norms, filled from NumPy
    (eager JAX initialisation is slow on a loaded machine)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.5 * rng.normal(size=leaf.shape), jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def tiny_lm(seed: int = 0) -> lm.LM:
    """A 1-layer Qwen2 with vocabulary 5: peaked next-token distributions that are not
    degenerate."""
    config = lm.LMConfig(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return random_module(lambda: lm.LM(config, rngs=nnx.Rngs(0)), seed)


def iid_tv(target, n, reps=200, seed=0):
    """Mean total variation of an i.i.d. sample of size ``n`` from ``target`` (the yardstick)."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, target, size=reps) / n
    return 0.5 * np.abs(counts - target[None, :]).sum(axis=1).mean()


def digest(result) -> str:
    """SHA-256 (first 32 hex digits) of every leaf of an Result (``budget`` and ``info``
    entries included): path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(legacy_lm_result(result)):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}:".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]

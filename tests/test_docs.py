"""The code in docs/design.md runs as written and does what the text says.

"How to add a method" defines a tempered SMC sampler on a FlowModel; run on the exact Gaussian
mixture with a linear reward, its weighted particles must match the closed-form tilted mixture
(mean and log-normalizer) within tolerances derived from the effective sample size.
"""

import pathlib
import re

import numpy as np

from tts_jax.models import gmm as G

from .helpers import weighted_moments

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DESIGN = DOCS / "design.md"

# Discretization allowances of the example's Euler ODE solves (200 steps to draw x ~ p, 40 steps
# back from s = 0.4 in every move), measured over 32 seeds at N = 4096: mean bias about 0.01,
# log Z bias about 0.02. Statistical errors are added on top from the sample size.
MEAN_SLACK = 0.02
LOG_Z_SLACK = 0.03


def _section(title: str) -> str:
    """The text of the ``## title`` section of design.md (up to the next ``## `` heading)."""
    text = DESIGN.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"design.md has no section {title!r}"
    return match.group(1)


def _run_python_blocks(title: str) -> dict:
    """Execute the ```python blocks of a section in one namespace and return it."""
    blocks = re.findall(r"```python\n(.*?)```", _section(title), re.S)
    assert blocks, f"section {title!r} has no python block"
    scope: dict = {}
    exec(compile("\n".join(blocks), f"{DESIGN}:{title}", "exec"), scope)
    return scope


def test_how_to_add_a_method_targets_the_closed_form_tilt(capsys):
    scope = _run_python_blocks("How to add a method")
    state, infos, mixture, direction = (
        scope[k] for k in ("state", "infos", "mixture", "direction")
    )
    lam = float(scope["params"].lam)
    assert capsys.readouterr().out.strip()  # the example prints its comparison
    assert infos.ess.shape == (8,) and bool(np.asarray(infos.resampled).any())

    tilted, log_z = G.tilt_linear(mixture, direction, lam)
    exact = np.asarray(G.mean(tilted), np.float64)
    weights = np.exp(np.asarray(state.particles.log_weights, np.float64))
    mean, se = weighted_moments(np.asarray(state.particles.state), weights)
    bound = 4 * se + MEAN_SLACK
    assert (np.abs(mean - exact) < bound).all(), (mean, exact, bound)

    # log Z: each resampling epoch (ended by a resampling or by the last step) adds about
    # (1 / ESS - 1 / N) to the variance of log Z_hat, ESS being its weights' at the epoch's end.
    n = weights.shape[0]
    ends = np.asarray(infos.resampled).copy()
    ends[-1] = True
    ess = np.asarray(infos.ess, np.float64)[ends]
    se_log_z = np.sqrt(np.sum(1.0 / ess - 1.0 / n))
    log_z_bound = 4 * se_log_z + LOG_Z_SLACK
    assert abs(float(state.log_evidence) - float(log_z)) < log_z_bound, (state.log_evidence, log_z)

    # The check has teeth: the untilted mixture, or a tilt one tempering step short
    # (lam (K - 1) / K, a typical off-by-one), would fail it.
    assert (np.abs(np.asarray(G.mean(mixture)) - exact) > 10 * bound).any()
    _, log_z_short = G.tilt_linear(mixture, direction, lam * 7 / 8)
    assert abs(float(log_z_short) - float(log_z)) > 1.5 * log_z_bound


def test_how_to_add_a_model_samples_the_model():
    scope = _run_python_blocks("How to add a model")
    samples = np.asarray(scope["samples"], np.float64)
    mu = np.asarray(scope["model"].params["mu"])
    mean, se = weighted_moments(samples)
    assert (np.abs(mean - mu) < 5 * se + 0.02).all(), (mean, mu)  # 50 Euler steps: small bias
    assert np.allclose(samples.std(0), 1.0, atol=0.1)


def test_how_to_add_a_reward_scores_each_particle():
    scope = _run_python_blocks("How to add a reward")
    images = np.asarray(scope["images"])
    flat = images.reshape(len(images), -1)
    np.testing.assert_allclose(scope["scores"], flat.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scope["host_scores"], -np.linalg.norm(flat, axis=1), rtol=1e-5)


def test_design_links_the_other_docs():
    text = DESIGN.read_text()
    for name in ("algorithms.md", "policies.md"):
        assert f"]({name})" in text and (DOCS / name).exists(), name

"""The shipped digits DiT gives the same outputs in diffusers PyTorch as in tts-jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tts_jax.models.dit import dit_apply, load_dit
from tts_jax.models.zoo import asset_path

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_shipped_digits_dit_matches_diffusers():
    folder = asset_path("digits-dit")
    _, model = load_dit(folder)
    reference = diffusers.DiTTransformer2DModel.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    timestep = np.array([0.0, 3.0, 250.0, 500.0, 900.0, 1000.0], np.float32)
    labels = np.array([0, 3, 5, 7, 9, 10])  # 10 = the null label (unconditional)
    ours = jax.jit(dit_apply)(nnx.split(model), jnp.asarray(x), timestep, labels)
    with torch.no_grad():
        ref = reference(torch.tensor(x), torch.tensor(timestep), torch.tensor(labels)).sample
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4, rtol=0)

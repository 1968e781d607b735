"""Digit classifiers: shipped accuracy, functional apply, safetensors save/load, bad folders.

Weights for the small configs are drawn with NumPy into ``nnx.eval_shape`` structures: eager JAX
initialization would compile every random op and dominate the test time.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.app.data.digits import split_digits
from tts_jax.models.classifier import (
    ClassifierConfig,
    build_module,
    load_classifier,
    save_classifier,
    to_classifier,
)

ASSETS = Path(__file__).resolve().parents[2] / "tts_jax" / "assets"
SMALL_MLP = ClassifierConfig(architecture="mlp", hidden=(12, 10), features=5, num_classes=3)


@jax.jit
def _apply(classifier, x):
    return classifier(x)


def _random_module(config: ClassifierConfig, seed: int):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_module(config)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), nnx.to_pure_dict(state)
    )
    return nnx.merge(graphdef, params)


@pytest.mark.parametrize("name", ["digits-verifier", "digits-heldout"])
def test_shipped_classifier_accuracy_on_its_heldout_split(name):
    folder = ASSETS / name
    metrics = json.loads((folder / "metrics.json").read_text())
    clf = load_classifier(folder)
    train, heldout = split_digits(metrics["train"]["part"], metrics["train"]["split_seed"])
    logits, features = _apply(clf, jnp.asarray(heldout.images))
    assert logits.shape == (len(heldout.labels), 10)
    assert features.shape == (len(heldout.labels), clf.config.features)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == heldout.labels))
    assert acc >= 0.97
    assert acc == pytest.approx(metrics["heldout_accuracy"], abs=2e-3)
    assert metrics["num_train"] == len(train.labels)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 300_000


def test_shipped_classifiers_differ_in_architecture_and_training_data():
    cfgs = [
        json.loads((ASSETS / n / "metrics.json").read_text())["train"]
        for n in ("digits-verifier", "digits-heldout")
    ]
    assert {c["model"]["architecture"] for c in cfgs} == {"cnn", "mlp"}
    assert {c["part"] for c in cfgs} == {"a", "b"}  # disjoint training digits
    assert len({c["split_seed"] for c in cfgs}) == 1


def test_apply_is_pure_with_weights_as_argument():
    traces = 0

    @jax.jit
    def logits(clf, x):
        nonlocal traces
        traces += 1
        return clf(x)[0]

    x = jnp.asarray(split_digits("a")[1].images[:5])
    clf = load_classifier(ASSETS / "digits-verifier")
    other = clf.replace(params=jax.tree.map(lambda p: 0.5 * p, clf.params))
    la, lb = logits(clf, x), logits(other, x)
    assert traces == 1
    assert la.shape == (5, 10)
    assert not np.allclose(la, lb)
    module = nnx.merge(clf.graphdef, clf.params)
    np.testing.assert_allclose(la, nnx.jit(lambda m, x: m(x)[0])(module, x), rtol=1e-6)


@pytest.mark.parametrize("source", ["digits-verifier", "digits-heldout", "small-mlp"])
def test_save_load_round_trip(tmp_path, source):
    if source == "small-mlp":
        config, module = SMALL_MLP, _random_module(SMALL_MLP, 0)
    else:
        clf = load_classifier(ASSETS / source)
        config, module = clf.config, nnx.merge(clf.graphdef, clf.params)
    save_classifier(tmp_path / "clf", config, module)
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.config == config
    want = to_classifier(config, module)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, want.params)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 1, 8, 8)), jnp.float32)
    for got, ref in zip(_apply(loaded, x), _apply(want, x), strict=True):
        np.testing.assert_array_equal(got, ref)
    assert _apply(loaded, x)[0].shape == (4, config.num_classes)


def test_config_validation_and_shapes():
    with pytest.raises(ValueError, match="unknown architecture"):
        ClassifierConfig(architecture="vit", hidden=(4,), features=2)
    with pytest.raises(ValueError, match="not divisible"):
        ClassifierConfig(architecture="cnn", hidden=(4, 4, 4, 4, 4), features=2)
    with pytest.raises(ValueError, match="positive"):
        ClassifierConfig(architecture="mlp", hidden=(0,), features=2)
    cnn = ClassifierConfig(architecture="cnn", hidden=(4, 8), features=6)
    state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_module(cnn))))
    assert state["convs"][1]["kernel"].shape == (3, 3, 4, 8)
    assert state["feature"]["kernel"].shape == (4 * 4 * 8, 6)  # one 2x2 pooling
    assert ClassifierConfig.from_dict(json.loads(json.dumps(cnn.to_dict()))) == cnn


def _corrupt(folder: Path, problem: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if problem == "no config.json":
        (folder / "config.json").unlink()
    elif problem == "no model.safetensors":
        (folder / "model.safetensors").unlink()
    elif problem == "invalid":
        (folder / "config.json").write_text("{not json")
    elif problem == "unknown classifier config keys":
        (folder / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    elif problem == "unknown architecture":
        (folder / "config.json").write_text(json.dumps({**config, "architecture": "vit"}))
    elif problem == "missing tensors":
        (folder / "config.json").write_text(json.dumps({**config, "hidden": [16, 32, 64, 64]}))
    elif problem == "expected float32":
        (folder / "config.json").write_text(json.dumps({**config, "features": 7}))
    elif problem == "'head.bias' is float16":
        tensors = load_file(folder / "model.safetensors")
        tensors["head.bias"] = tensors["head.bias"].astype(np.float16)
        save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(
    "problem",
    [
        "no config.json",
        "no model.safetensors",
        "invalid",
        "unknown classifier config keys",
        "unknown architecture",
        "missing tensors",
        "expected float32",
        "'head.bias' is float16",
    ],
)
def test_malformed_folder_names_the_problem(tmp_path, problem):
    folder = tmp_path / "clf"
    shutil.copytree(ASSETS / "digits-verifier", folder)
    _corrupt(folder, problem)
    with pytest.raises((ValueError, FileNotFoundError), match=problem):
        load_classifier(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "nowhere")

"""The training modules' shared interface: they write into ``--out`` and touch the shipped assets
(``tts_jax/assets``) only with ``--install``."""

import hashlib
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

import tts_jax
from tts_jax.app import training
from tts_jax.app.training import MODULES

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = pathlib.Path(tts_jax.__file__).resolve().parent / "assets"


def _env() -> dict:
    return {**os.environ, "COLUMNS": "1000", "JAX_PLATFORMS": "cpu"}


def _asset_hashes() -> dict[str, tuple[str, int]]:
    """``{path: (sha256, mtime in ns)}`` of every file under the assets: the modification time
    also catches a rewrite with identical bytes (the small tokenizer equals the shipped one)."""
    return {
        str(p.relative_to(ASSETS)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(ASSETS.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def guarded_assets():
    """Fails if a test changed, added or removed a file under tts_jax/assets, and then puts the
    original bytes back (so a script that wrongly writes there cannot damage the checkout)."""
    before = {
        str(p.relative_to(ASSETS)): p.read_bytes() for p in sorted(ASSETS.rglob("*")) if p.is_file()
    }
    hashes = _asset_hashes()
    yield
    after = _asset_hashes()
    if after != hashes:
        for rel, data in before.items():
            if after.get(rel, ("",))[0] != hashes[rel][0]:
                (ASSETS / rel).write_bytes(data)
        for rel in set(after) - set(before):
            (ASSETS / rel).unlink()
        changed = sorted(k for k in set(after) | set(hashes) if after.get(k) != hashes.get(k))
        pytest.fail(f"tts_jax/assets was written without --install (restored): {changed}")


def test_every_training_script_has_out_and_install_and_defaults_outside_the_assets(
    tmp_path, monkeypatch, capsys, guarded_assets
):
    """``python -m <module> --help`` of every training module (run in this interpreter, as the
    modules' imports are slow to repeat)."""
    folder = pathlib.Path(training.__file__).parent
    modules = {f"tts_jax.app.training.{p.stem}" for p in folder.glob("*.py")}
    assert modules - {"tts_jax.app.training.__init__", "tts_jax.app.training.common"} == set(
        MODULES.values()
    )
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped help lines
    monkeypatch.chdir(tmp_path)
    for name, script in MODULES.items():
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--out DIR" in text and "--install" in text, (script, text)
        default = re.search(r"--out DIR .*?\(default: ([^,)\s]+)", text)
        assert default, (script, text)
        assert default.group(1) == f"outputs/train/{name}", (script, default.group(1))
        # relative to the working directory; not inside the assets even when run from the repo
        for cwd in (ROOT, tmp_path):
            assert not (cwd / default.group(1)).resolve().is_relative_to(ASSETS)
        assert re.search(r"--install .*tts_jax/assets/", text), (script, text)


def test_tokenizer_training_writes_only_into_its_out_folder(tmp_path, guarded_assets):
    """A real (small) run with the default --out, from tmp_path: the assets stay byte-identical."""
    proc = subprocess.run(
        [sys.executable, "-m", MODULES["arith-tokenizer"], "--n-problems", "50"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "train" / "arith-tokenizer"
    assert sorted(p.name for p in out.iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer_training.json",
    ]
    assert json.loads((out / "tokenizer_training.json").read_text())["n_problems"] == 50
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert "assets untouched" in proc.stdout


def test_tokenizer_install_copies_only_the_tokenizer_files(
    tmp_path, monkeypatch, capsys, guarded_assets
):
    """``--install`` (with the assets root pointed at tmp_path) replaces the tokenizer files of
    ``arith-lm`` and leaves the policy's weights there alone."""
    from tts_jax.app.training import arith_tokenizer as train_arith_tokenizer
    from tts_jax.app.training import common as train_common

    assets = tmp_path / "assets"
    (assets / "arith-lm").mkdir(parents=True)
    (assets / "arith-lm" / "tokenizer.json").write_text("old")
    (assets / "arith-lm" / "model.safetensors").write_text("weights")
    monkeypatch.setattr(train_common, "ASSETS_ROOT", assets)
    out = tmp_path / "out"
    argv = ["x", "--out", str(out), "--install", "--n-problems", "50"]
    monkeypatch.setattr(sys, "argv", argv)
    train_arith_tokenizer.main()
    printed = capsys.readouterr().out
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (assets / "arith-lm" / f).read_bytes() == (out / f).read_bytes()
    assert (assets / "arith-lm" / "model.safetensors").read_text() == "weights"
    assert not (assets / "arith-lm" / "tokenizer_training.json").exists()
    assert "replaced" in printed and "added" in printed


def test_install_asset_copies_into_the_given_assets_root(tmp_path, capsys):
    from tts_jax.app.training.common import install_asset

    src, root = tmp_path / "out", tmp_path / "assets"
    src.mkdir()
    (src / "config.json").write_text("new config")
    (src / "model.safetensors").write_bytes(b"\x00weights")
    (src / "checkpoints").mkdir()  # not a file: never installed by default
    (root / "m").mkdir(parents=True)
    (root / "m" / "config.json").write_text("old config")
    (root / "m" / "other.txt").write_text("keep")

    written = install_asset(src, "m", assets_root=root)
    assert written == [root / "m" / "config.json", root / "m" / "model.safetensors"]
    assert (root / "m" / "config.json").read_text() == "new config"
    assert (root / "m" / "model.safetensors").read_bytes() == b"\x00weights"
    assert (root / "m" / "other.txt").read_text() == "keep"
    assert not (root / "m" / "checkpoints").exists()
    printed = capsys.readouterr().out
    assert re.search(r"replaced .*config\.json", printed)
    assert re.search(r"added .*model\.safetensors", printed)

    install_asset(src, "m", ["config.json"], assets_root=root)
    assert "unchanged" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="missing.json"):
        install_asset(src, "new", ["config.json", "missing.json"], assets_root=root)
    assert not (root / "new").exists()


def test_out_inside_the_assets_is_refused(tmp_path):
    from tts_jax.app.training.common import check_out

    root = tmp_path / "assets"
    with pytest.raises(SystemExit, match="--install"):
        check_out(root / "arith-lm", assets_root=root)
    assert check_out(tmp_path / "outputs", assets_root=root) == tmp_path / "outputs"

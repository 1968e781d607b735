"""The library and the application layer stay apart: the library never imports tts_jax.app."""

import pkgutil
import subprocess
import sys

import tts_jax


def test_the_library_never_imports_the_application_layer():
    library = sorted(
        m.name
        for m in pkgutil.walk_packages(tts_jax.__path__, "tts_jax.")
        if not m.name.startswith(("tts_jax.app", "tts_jax.assets"))
    )
    assert "tts_jax.samplers.image.fk_steering" in library and "tts_jax.models.lm" in library
    code = (
        "import importlib, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('tts_jax.app')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"library modules import the app layer: {out.stdout}"

"""The Colab-ready notebooks execute top to bottom on CPU (small budgets) and are stored executed.

They are stored with their outputs (plots as embedded PNGs) so a reader sees the results on
GitHub or Colab without running them; executing them here must not modify the stored files.

The text-to-image notebook loads a hub pipeline and a CLIP reward on Colab; here it runs on a tiny
random SD3 folder and a tiny random CLIP folder (tests/t2i_folders.py, tests/clip_folders.py),
named by the environment variables it reads (:data:`T2I_NOTEBOOK`), with unoptimised XLA
compiles (the programs are tiny); it is stored executed that way.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks").glob("*.ipynb")
)
MAX_BYTES = 1_000_000
T2I_NOTEBOOK = "text_to_image_steering"
FAST_XLA = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)


def tiny_t2i_environment(folder: pathlib.Path) -> dict[str, str]:
    """The environment variables that point the text-to-image notebook at tiny random folders
    (built in ``folder``)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests import clip_folders, t2i_folders

    return {
        "TTS_JAX_NOTEBOOK_PIPELINE": str(t2i_folders.make_tiny_sd3(folder / "sd3")),
        "TTS_JAX_NOTEBOOK_CLIP": str(clip_folders.make_tiny_clip(folder / "clip", head=False)),
        "XLA_FLAGS": FAST_XLA,
        "OMP_NUM_THREADS": "1",
    }


def _errors(notebook) -> list:
    return [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    if path.stem == T2I_NOTEBOOK:  # the kernel inherits these
        for name, value in tiny_t2i_environment(tmp_path / "folders").items():
            monkeypatch.setenv(name, value)
    stored = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert not _errors(notebook)
    assert path.read_bytes() == stored, f"executing {path.name} modified the stored file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    """Every code cell ran, in order, in one session; no errors; plots are embedded PNGs."""
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored executed top to bottom (execution counts {counts}); "
        "execute it and save it with its outputs"
    )
    assert not _errors(notebook)
    assert any(c.get("outputs") for c in code), f"{path.name} is stored without outputs"
    plots = sum("plt." in c.source or "display(Image" in c.source for c in code)
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= plots, f"{path.name}: {plots} plotting cells but {pngs} embedded PNGs"
    assert path.stat().st_size < MAX_BYTES


def test_there_are_three_notebooks():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "bring_your_own_model", T2I_NOTEBOOK}

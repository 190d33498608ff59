"""The notebooks: in sync with their sources in notebooks/src/, and they run top to bottom."""

import importlib.util
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from jupyter_client.kernelspec import KernelSpec  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
SOURCES = build.sources()


class _ThisInterpreter(KernelManager):
    """A kernel manager whose kernel is this very interpreter (no global kernelspec needed)."""

    @property
    def kernel_spec(self):
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return KernelSpec(argv=argv, display_name="hesskit tests", language="python")


def test_there_are_notebooks():
    stems = [s.stem for s in SOURCES]
    assert stems and all(s[:2].isdigit() and s[2] == "_" for s in stems), stems


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_matches_source(source):
    committed = build.target(source)
    assert committed.exists(), f"{committed.name} missing: run python notebooks/build.py"
    assert committed.read_text() == build.render(source), (
        f"{committed.name} is out of date with src/{source.name}: run python notebooks/build.py"
    )


def test_build_splits_cells(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("# %% [markdown]\n# # Title\n# text\n\n# %%\nx = 1\n\n# %%\n\n# %%\nprint(x)\n")
    nb = build.build(src)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == "# Title\ntext"
    assert nb.cells[2].source == "print(x)"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source, tmp_path):
    nb = build.build(source)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_manager_class=_ThisInterpreter,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    first = nb.cells[0].outputs[0]
    assert first["text"].strip() == sys.executable
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out

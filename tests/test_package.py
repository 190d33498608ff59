"""The package as users get it: submodules as attributes, lazy optional imports, one version,
the command line's --version, and a wheel that works outside the repository."""

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest
from wheel_check import REPO, check_wheel

import hesskit as hk
from hesskit._src import report


def test_submodules_are_attributes():
    assert hk.transforms.noisy_sgd is hk.noisy_sgd
    assert hk.transforms.NegativeCurvatureState is not None
    assert hk.diagnostics.Tracker is hk.Tracker
    assert callable(hk.examples.load_digits)
    assert callable(hk.plots.plot_spectral_density)
    assert {"transforms", "diagnostics", "examples", "plots"} <= set(dir(hk))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        hk.nonexistent  # noqa: B018


def test_import_does_not_load_optional_modules():
    # A fresh interpreter: this process has long since imported matplotlib through other tests.
    code = (
        "import sys, hesskit\n"
        "loaded = [m for m in ('matplotlib', 'hesskit.plots', 'hesskit.examples', 'sklearn')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "hesskit.plots.plot_spectral_density\n"
        "assert 'hesskit.plots' in sys.modules and 'matplotlib' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_one_version_string():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "hesskit/__init__.py"
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as fh:
        assert f"## [{hk.__version__}]" in fh.read()


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        report.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hesskit {hk.__version__}"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    out = check_wheel(str(tmp_path))
    assert os.path.realpath(out["file"]).startswith(os.path.realpath(out["site"]))
    assert out["version"] == hk.__version__
    assert out["cli_version"] == f"hesskit {hk.__version__}"
    assert out["py_typed"]
    assert out["eigenvalues"] == pytest.approx([6.0, 5.0], rel=1e-5)
    assert all(out["converged"])
    assert "hesskit/py.typed" in out["wheel_files"]
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in out["wheel_files"])
    with zipfile.ZipFile(out["wheel"]) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        assert f"Version: {hk.__version__}\n" in zf.read(meta).decode()
    with tarfile.open(out["sdist"]) as tf:
        assert f"hesskit-{hk.__version__}/hesskit/py.typed" in tf.getnames()

"""Build hesskit's sdist and wheel, install the wheel alone and use it from outside the repo.

``python tests/wheel_check.py`` (``make check-wheel``) and ``tests/test_package.py`` both run
:func:`check_wheel`. Installing jax from PyPI into a fresh environment on every run would take
minutes, so the wheel is installed with ``--no-deps`` into a bare target folder, and a child
process of the current interpreter imports hesskit from that folder (its dependencies come from
the current environment) with the working directory outside the repository, so the source tree
cannot be imported by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child: where hesskit came from, its version, py.typed, and a 6x6 eigsh.
CHILD = r"""
import importlib.resources, json
import jax, jax.numpy as jnp
import hesskit as hk
d = jnp.arange(1.0, 7.0, dtype=jnp.float32)
op = hk.LinearOperator(lambda v: d * v, jnp.zeros(6, jnp.float32))
res = hk.eigsh(op, jax.random.key(0), k=2, which="LA")
print(json.dumps({
    "file": hk.__file__,
    "version": hk.__version__,
    "py_typed": importlib.resources.files("hesskit").joinpath("py.typed").is_file(),
    "eigenvalues": [float(x) for x in res.eigenvalues],
    "converged": [bool(x) for x in res.converged],
}))
"""


def _run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        msg = f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        raise RuntimeError(msg)
    return proc.stdout


def check_wheel(workdir: str) -> dict:
    """Build, install and exercise the wheel under ``workdir``; raise on the first failure.

    Args:
        workdir: an empty scratch folder; ``dist/`` and ``site/`` are created in it.

    Returns:
        What the child process reported (``file``, ``version``, ``py_typed``, ``eigenvalues``,
        ``converged``), plus ``wheel``, ``sdist`` (their paths), ``wheel_files`` (the names in
        the wheel) and ``cli_version`` (what ``python -m hesskit --version`` printed).
    """
    dist = os.path.join(workdir, "dist")
    site = os.path.join(workdir, "site")
    # No isolation: the build backend (hatchling, in the test extra) comes from this
    # environment, so the check needs no network and takes about a second.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO])
    wheel = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl"))
    sdist = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".tar.gz"))
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, wheel])
    env = {**os.environ, "PYTHONPATH": site}
    out = json.loads(_run([sys.executable, "-c", CHILD], cwd=workdir, env=env).splitlines()[-1])
    out["cli_version"] = _run(
        [sys.executable, "-m", "hesskit", "--version"], cwd=workdir, env=env
    ).strip()
    with zipfile.ZipFile(wheel) as zf:
        out["wheel_files"] = zf.namelist()
    out.update(wheel=wheel, sdist=sdist, site=site)
    return out


def main() -> int:
    """Run :func:`check_wheel` in a temporary folder and check what it reports."""
    with tempfile.TemporaryDirectory() as tmp:
        out = check_wheel(tmp)
        problems = []
        if not os.path.realpath(out["file"]).startswith(os.path.realpath(out["site"])):
            problems.append(f"hesskit imported from {out['file']}, not from the wheel")
        if not out["py_typed"]:
            problems.append("py.typed is missing from the installed wheel")
        if out["cli_version"] != f"hesskit {out['version']}":
            problems.append(f"--version printed {out['cli_version']!r}")
        if [round(x, 4) for x in out["eigenvalues"]] != [6.0, 5.0] or not all(out["converged"]):
            problems.append(f"eigsh gave {out['eigenvalues']}, converged {out['converged']}")
        wheel, sdist = os.path.basename(out["wheel"]), os.path.basename(out["sdist"])
        if problems:
            print("check-wheel FAILED:\n  " + "\n  ".join(problems))
            return 1
        print(f"check-wheel ok: {wheel} and {sdist}; hesskit {out['version']} from the wheel, ")
        print(f"  py.typed present, eigsh LA(2) of diag(1..6) = {out['eigenvalues']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

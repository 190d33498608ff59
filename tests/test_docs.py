"""The documentation site: every Python block of every page runs, and the site builds strictly.

Each page's ```python blocks run in order in one namespace (a page is one session, as a reader
would type it); the blocks use small sizes so the whole set stays fast. ``mkdocs build
--strict`` (warnings are errors: a broken link, a docstring mkdocstrings cannot parse) runs
where mkdocs is installed (the ``docs`` extra, part of ``make test``'s install).
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_guides_have_code():
    guides = [p for p in PAGES if p.parent.name == "guides"]
    assert len(guides) >= 9
    # Every guide is reachable from the site's navigation.
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"guides/{p.name}" in nav for p in guides), [p.name for p in guides]
    assert all(python_blocks(p) for p in guides if p.stem != "index")


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(DOCS))
)
def test_page_code_runs(page, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("equinox")
    namespace = {"__name__": f"docs_{page.stem}"}
    # The pages are written for jax's default, x64 off (the suite otherwise runs with it on).
    with jax.enable_x64(False):
        for i, block in enumerate(python_blocks(page)):
            code = compile(block, f"{page.relative_to(ROOT)}[block {i}]", "exec")
            exec(code, namespace)  # noqa: S102
    capsys.readouterr()


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="needs the docs extra")
def test_mkdocs_build_strict(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    api = (tmp_path / "site" / "api" / "hesskit" / "index.html").read_text()
    for name in ("hesskit.eigsh", "hesskit.hessian_operator", "hesskit.LinearOperator"):
        assert f'id="{name}"' in api, name

"""Build the notebooks from their percent-format sources in ``notebooks/src/``.

Each ``src/NAME.py`` is split into cells at ``# %%`` lines; a ``# %% [markdown]`` cell holds
markdown written as ``# ``-prefixed comment lines. The notebooks are written without outputs,
so the committed ``.ipynb`` files are exactly what this script produces (a test checks it).

Usage: ``python notebooks/build.py`` (writes ``notebooks/NAME.ipynb``), or ``--check`` to exit 1
when a notebook is out of date.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"


def _cells(text: str) -> list[tuple[str, str]]:
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            msg = f"text before the first '# %%' cell marker: {line!r}"
            raise ValueError(msg)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        body = "\n".join(lines).strip("\n")
        if body:
            out.append((kind, body))
    return out


def build(source: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook (without outputs) for one percent-format source file."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, body) in enumerate(_cells(source.read_text())):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(body)
        cell.id = f"{source.stem}-{i}"  # stable ids keep rebuilt notebooks byte-identical
        nb.cells.append(cell)
    return nb


def sources() -> list[pathlib.Path]:
    """The notebook sources, in order."""
    return sorted(SRC.glob("*.py"))


def target(source: pathlib.Path) -> pathlib.Path:
    """Where the notebook for ``source`` lives."""
    return HERE / f"{source.stem}.ipynb"


def render(source: pathlib.Path) -> str:
    """The exact text written for ``source``."""
    return nbformat.writes(build(source)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) every notebook; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is stale")
    args = parser.parse_args(argv)
    stale = []
    for src in sources():
        text = render(src)
        dst = target(src)
        if args.check:
            if not dst.exists() or dst.read_text() != text:
                stale.append(dst.name)
        else:
            dst.write_text(text)
            print(f"wrote {dst.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

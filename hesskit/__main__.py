"""Command line entry point: ``python -m hesskit report ...`` (also the ``hesskit`` script)."""

from __future__ import annotations

import sys

from hesskit._src.report import main

if __name__ == "__main__":
    sys.exit(main())

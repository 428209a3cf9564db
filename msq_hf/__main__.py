"""``python -m msq_hf ...``: the same command line as the ``msq-hf`` console script."""

from __future__ import annotations

import sys

from msq_hf.commands.main import main

if __name__ == "__main__":
    sys.exit(main())

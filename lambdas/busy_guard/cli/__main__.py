"""``python -m busy_guard.cli``: the ``busy-guard`` console script without installing it."""

import sys

from busy_guard.cli import main

if __name__ == "__main__":  # importing it (pkgutil walks, doc tools) must not run the CLI
    sys.exit(main())

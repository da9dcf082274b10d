"""The ``busy-guard`` console script: ``busy_guard.cli.main``, or one line naming the missing extra.

The base install is the writer library (boto3 alone); the CLI also needs pydantic, through the guard's
settings model. Every install gets the console script, so without the extra it must say what to
install instead of printing an ImportError's traceback. Kept outside ``busy_guard.cli``, whose
``__init__`` is what fails to import.
"""

from __future__ import annotations

import sys

from busy_guard._version import __version__

# The top-level modules the ``cli`` extra brings; any other missing module is a bug, not advice.
CLI_EXTRA_MODULES = frozenset({"pydantic", "pydantic_core", "annotated_types", "typing_inspection"})
CLI_EXTRA_HINT = (
    "pip install 'busy-guard[cli] @ git+https://github.com/<owner>/busy-guard@v" + __version__ + "'"
)
EXIT_USAGE = 2  # the CLI's code for bad configuration (busy_guard.cli.common.EXIT_USAGE)


def main() -> int:
    try:
        from busy_guard.cli import main as cli_main  # noqa: PLC0415 - the import is what may fail
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing.split(".")[0] not in CLI_EXTRA_MODULES:
            raise
        print(
            f"busy-guard: the command line needs the 'cli' extra ({missing} is not installed): "
            f"{CLI_EXTRA_HINT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return cli_main()

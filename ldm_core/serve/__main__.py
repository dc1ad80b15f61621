"""``python -m ldm_core.serve``: an alias for ``ldm serve`` (the command KServe's
ServingRuntime and the local deploy run), parsed by the one ``ldm`` parser."""

from __future__ import annotations

import sys

from ldm_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

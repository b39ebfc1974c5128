"""``python -m fastapi_catga``: the ``catga`` command line (see `fastapi_catga.cli`)."""

import sys

from fastapi_catga.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The operators' command line, ``catga`` (or ``python -m fastapi_catga``).

It talks to the cluster's broker as a client (it joins no cluster and runs no handler), configured
from the same ``CATGA_*`` settings as the app:

- `main`: arguments, settings, exit codes; `commands`: ``nodes``, ``health``, ``dead-letters`` and
  the broker connection; `watch`, `send`: those commands; `render`: tables and JSON.
- `exits`: 0 ok, 1 the operation failed, 2 usage error, 3 broker unreachable or misconfigured.
"""

from fastapi_catga.cli.main import main

__all__ = ["main"]

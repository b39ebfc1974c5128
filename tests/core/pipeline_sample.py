"""Messages and a fake handler that the pipeline and behavior tests share."""

from __future__ import annotations

from typing import Any

from fastapi_catga import Command, Query


class PPing(Command[str]):
    text: str = "ping"


class POther(Query[str]):
    pass


async def echo(message: PPing) -> str:
    return f"handled {message.text}"


async def other(message: POther) -> str:
    return "other"


class Counter:
    """A fake handler: counts calls, fails with the queued errors first."""

    def __init__(self, *errors: Exception, result: Any = "done") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    async def __call__(self, message: Any = None) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result

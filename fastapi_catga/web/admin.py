"""`catga_admin_router`: the dead-letter store over HTTP. Opt-in, and apart from `catga_router`,
because it writes: mount it behind your own auth.

    app.include_router(catga_admin_router, dependencies=[Depends(require_admin)])

| route | answer |
|---|---|
| ``GET /catga/dead-letters?limit=100`` | the dead letters, oldest first |
| ``GET /catga/dead-letters/{id}`` | one, or 404 |
| ``POST /catga/dead-letters/{id}/replay`` | put it back in its queue (202), or 404 |
| ``DELETE /catga/dead-letters/{id}`` | discard it (204), or 404 |
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from fastapi_catga.core.dead_letter import DeadLetter
from fastapi_catga.core.mediator import Mediator
from fastapi_catga.web.dependencies import get_mediator

__all__ = ["catga_admin_router"]

catga_admin_router = APIRouter(prefix="/catga/dead-letters", tags=["catga admin"])
MediatorDep = Annotated[Mediator, Depends(get_mediator)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No dead letter with this id"}}


@catga_admin_router.get("", response_model=list[DeadLetter], summary="Dead letters, oldest first")
async def list_dead_letters(
    mediator: MediatorDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeadLetter]:
    return await mediator.dead_letters.list(limit)


@catga_admin_router.get(
    "/{letter_id:path}", response_model=DeadLetter, responses=_NOT_FOUND, summary="One dead letter"
)
async def get_dead_letter(letter_id: str, mediator: MediatorDep) -> DeadLetter:
    letter = await mediator.dead_letters.get(letter_id)
    if letter is None:
        raise HTTPException(404, f"no dead letter {letter_id!r}")
    return letter


@catga_admin_router.post(
    "/{letter_id:path}/replay", status_code=202, responses=_NOT_FOUND, summary="Put it back in its queue"
)
async def replay_dead_letter(letter_id: str, mediator: MediatorDep) -> dict[str, str]:
    if not await mediator.dead_letters.replay(letter_id):
        raise HTTPException(404, f"no dead letter {letter_id!r}")
    return {"replayed": letter_id}


@catga_admin_router.delete("/{letter_id:path}", status_code=204, responses=_NOT_FOUND, summary="Discard it")
async def discard_dead_letter(letter_id: str, mediator: MediatorDep) -> Response:
    if not await mediator.dead_letters.discard(letter_id):
        raise HTTPException(404, f"no dead letter {letter_id!r}")
    return Response(status_code=204)

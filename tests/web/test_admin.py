"""`catga_admin_router`: the dead-letter store over HTTP, and protected the FastAPI way."""

from __future__ import annotations

import time
from typing import ClassVar

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from fastapi_catga import (
    CatgaSettings,
    Command,
    Durable,
    MediatorDep,
    Reject,
    catga_admin_router,
    catga_lifespan,
    handler,
)
from fastapi_catga.testing import InMemoryTransport


class Refund(Command[str]):
    durable: ClassVar[Durable | bool] = True
    order: str


fixed = False


@handler
async def refund(command: Refund) -> str:
    if not fixed:
        raise Reject("refunds are closed")
    return f"refunded {command.order}"


def require_admin(x_admin: str = Header("")) -> None:
    if x_admin != "yes":
        raise HTTPException(403, "admins only")


def admin_app() -> FastAPI:
    app = FastAPI(
        lifespan=catga_lifespan(
            settings=CatgaSettings(node_id="admin-node"), handlers=[refund], transport=InMemoryTransport()
        )
    )
    app.include_router(catga_admin_router, dependencies=[Depends(require_admin)])

    @app.post("/refunds/{order}", status_code=202)
    async def post_refund(order: str, mediator: MediatorDep, message_id: str | None = None) -> dict[str, str]:
        command = Refund(order=order) if message_id is None else Refund(order=order, message_id=message_id)
        accepted = await mediator.enqueue(command)
        return {"message_id": accepted.message_id}

    return app


def test_dead_letters_are_listed_replayed_and_discarded_over_http() -> None:
    global fixed
    fixed = False
    admin = {"x-admin": "yes"}
    with TestClient(admin_app()) as client:
        first = client.post("/refunds/o-1").json()["message_id"]
        second = client.post("/refunds/o-2").json()["message_id"]
        assert client.get("/catga/dead-letters").status_code == 403, "the app's own dependency guards it"

        def listed() -> list[dict[str, object]]:
            answer = client.get("/catga/dead-letters", headers=admin)
            assert answer.status_code == 200
            letters: list[dict[str, object]] = answer.json()
            return letters

        deadline = time.monotonic() + 5
        while len(listed()) < 2:
            assert time.monotonic() < deadline, listed()
            time.sleep(0.02)
        letters = {letter["message_id"]: letter for letter in listed()}
        assert letters[first]["reason"] == "rejected" and letters[first]["error_type"] == "Reject"
        one = client.get(f"/catga/dead-letters/workers:{first}", headers=admin)
        assert one.status_code == 200 and one.json()["attempts"] == 1
        assert client.get("/catga/dead-letters/workers:nope", headers=admin).status_code == 404

        fixed = True
        assert client.post(f"/catga/dead-letters/workers:{first}/replay", headers=admin).status_code == 202
        assert client.post(f"/catga/dead-letters/workers:{first}/replay", headers=admin).status_code == 404
        assert client.delete(f"/catga/dead-letters/workers:{second}", headers=admin).status_code == 204
        assert client.delete(f"/catga/dead-letters/workers:{second}", headers=admin).status_code == 404
        assert listed() == []


def test_a_dead_letter_whose_id_holds_a_slash_is_reached_over_http() -> None:
    """A caller's own message id may hold any character: the id is the rest of the path."""
    global fixed
    fixed = False
    admin = {"x-admin": "yes"}
    with TestClient(admin_app()) as client:
        client.post("/refunds/o-3", params={"message_id": "orders/o-3"})
        deadline = time.monotonic() + 5
        while client.get("/catga/dead-letters/workers:orders/o-3", headers=admin).status_code != 200:
            assert time.monotonic() < deadline, "the dead letter never showed"
            time.sleep(0.02)
        assert client.post("/catga/dead-letters/workers:orders/o-3/replay", headers=admin).status_code == 202
        deadline = time.monotonic() + 5
        while client.get("/catga/dead-letters/workers:orders/o-3", headers=admin).status_code != 200:
            assert time.monotonic() < deadline, "the replayed message was not dead-lettered again"
            time.sleep(0.02)
        assert client.delete("/catga/dead-letters/workers:orders/o-3", headers=admin).status_code == 204

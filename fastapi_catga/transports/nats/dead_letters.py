"""`NatsDeadLetters`: the stream ``CATGA_<cluster>_DLQ``, one subject per dead letter.

A letter with id ``i`` is the one message on ``catga.<cluster>.dur.dlq.<kv_key(i)>`` (Limits,
``max_msgs_per_subject`` 1, max age = retention): its body is the original envelope framed as on
every other subject, its header ``Catga-Dead-Letter`` the `DeadLetter` as ASCII JSON, so
``nats stream view CATGA_<cluster>_DLQ`` shows both.

Adding is idempotent by ``Nats-Expected-Last-Subject-Sequence: 0`` (the subject must be empty), not
by a ``Nats-Msg-Id``: with one, a letter discarded and dead-lettered again within the duplicate
window (replayed, failed again) would be dropped as a duplicate of itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import nats.js.errors
from nats.js import api
from pydantic import ValidationError

from fastapi_catga.core.envelope import Envelope, pack, unpack
from fastapi_catga.exceptions import MessageValidationError
from fastapi_catga.transports._shared import frame
from fastapi_catga.transports.durable import DeadLetter
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.errors import NatsErrors
from fastapi_catga.transports.nats.leases import kv_key
from fastapi_catga.transports.nats.streams import header_room, safe_name

__all__ = ["NatsDeadLetters"]

logger = logging.getLogger(__name__)

_HEADER = "Catga-Dead-Letter"
_WRONG_LAST = (10071, 10164)  # the subject holds a letter already
_NO_MESSAGE = 10037
_DUPLICATE_WINDOW = 120.0  # s; unused (no Nats-Msg-Id) but the server wants one <= max age


class NatsDeadLetters:
    """Dead letters of one cluster (see the module)."""

    def __init__(self, connection: NatsConnection, cluster: str, payload_limit: Callable[[], int]) -> None:
        self._connection = connection
        self._payload_limit = payload_limit
        self.stream = f"CATGA_{cluster}_DLQ"
        self._prefix = f"catga.{cluster}.dur.dlq."

    def stream_config(self, retention: float) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.stream,
            subjects=[f"{self._prefix}>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_msgs_per_subject=1,
            max_age=retention,
            duplicate_window=min(_DUPLICATE_WINDOW, retention),
        )

    def _subject(self, letter_id: str) -> str:
        return self._prefix + kv_key(letter_id)  # one subject token, one to one

    def _subjects(self, letter_id: str) -> list[str]:
        """Where a letter may be: its subject, then where versions before 0.2 put it (a shortened
        name and a 32-bit hash, which two ids could share)."""
        subject, legacy = self._subject(letter_id), self._prefix + safe_name(letter_id)
        return [subject] if legacy == subject else [subject, legacy]

    async def add(self, letter: DeadLetter, envelope: Envelope) -> bool:
        """Store the letter beside its message, its error text cut as far as the two must fit in
        one NATS message (a message near the payload limit leaves little room for the letter).

        Raises:
            MessageTooLargeError: even without its error text, the letter does not fit.
        """
        js, subject = self._connection.live()[1], self._subject(letter.id)
        limit = self._payload_limit()
        headers = _headers(letter, limit - len(pack(envelope)))
        data = frame(envelope, limit - header_room(headers), "NATS")
        with NatsErrors(f"dead letter {letter.id}"):
            try:
                await js.publish(subject, data, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
                return False  # a letter of this id is kept already
        return True

    async def get(self, letter_id: str) -> tuple[DeadLetter, Envelope] | None:
        js = self._connection.live()[1]
        with NatsErrors(f"dead letter {letter_id}"):
            for subject in self._subjects(letter_id):
                try:
                    msg = await js.get_last_msg(self.stream, subject)
                except nats.js.errors.NotFoundError as exc:
                    if exc.err_code != _NO_MESSAGE:
                        raise
                    continue
                found = _letter(msg)
                if found is not None and found[0].id == letter_id:
                    return found
        return None

    async def list(self, limit: int) -> list[tuple[DeadLetter, Envelope]]:
        """Oldest first: the next message on ``dlq.>`` from a sequence on, one request each."""
        js, seq = self._connection.live()[1], 1
        letters: list[tuple[DeadLetter, Envelope]] = []
        with NatsErrors(f"dead letters in {self.stream}"):
            while len(letters) < limit:
                try:
                    msg = await js.get_msg(self.stream, seq=seq, subject=f"{self._prefix}>", next=True)
                except nats.js.errors.NotFoundError as exc:
                    if exc.err_code != _NO_MESSAGE:
                        raise
                    break
                if (letter := _letter(msg)) is not None:
                    letters.append(letter)
                seq = (msg.seq or seq) + 1
        return letters

    async def remove(self, letter_id: str) -> bool:
        """Purge the letter's subject; True if it held one (the server counts what it purged)."""
        if await self.get(letter_id) is None:  # (a legacy subject may hold another id's letter)
            return False
        nc = self._connection.live()[0]
        purged = 0
        with NatsErrors(f"discarding dead letter {letter_id}"):
            for subject in self._subjects(letter_id):
                request = json.dumps({"filter": subject}).encode()
                reply = await nc.request(
                    f"$JS.API.STREAM.PURGE.{self.stream}", request, timeout=self._connection.connect_timeout
                )
                answer = json.loads(reply.data)
                if "error" in answer:
                    raise nats.js.errors.APIError.from_error(answer["error"])
                purged += int(answer.get("purged") or 0)
                if purged:
                    break
        return bool(purged)


def _headers(letter: DeadLetter, room: int) -> dict[str, str]:
    """The letter's headers, within ``room`` bytes if cutting its error text can do it."""
    while True:
        headers = {
            _HEADER: json.dumps(letter.model_dump(mode="json"), separators=(",", ":")),  # ASCII only
            "Nats-Expected-Last-Subject-Sequence": "0",
        }
        over = header_room(headers) - room
        if over <= 0 or not letter.error:
            return headers
        # Cut in proportion to the bytes each character takes (up to 12 escaped), and by one at least.
        text, size = letter.error, len(json.dumps(letter.error))
        keep = min(len(text) - 1, len(text) * (size - over - 30) // size)
        cut = text[: max(0, keep)].removesuffix(" [cut to fit]")
        letter = letter.model_copy(update={"error": f"{cut} [cut to fit]" if cut else ""})


def _letter(msg: api.RawStreamMsg) -> tuple[DeadLetter, Envelope] | None:
    try:
        letter = DeadLetter.model_validate_json((msg.headers or {})[_HEADER])
        return letter, unpack(msg.data or b"")
    except (KeyError, ValidationError, MessageValidationError) as exc:
        logger.warning("skipped an unreadable dead letter (%s, sequence %s): %s", msg.subject, msg.seq, exc)
        return None

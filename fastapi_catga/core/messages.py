"""Message base classes: `Command[R]`, `Query[R]` (one handler, returns R) and `Event` (fan-out)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "MAX_TIMEOUT",
    "Accepted",
    "Command",
    "Durable",
    "Event",
    "Message",
    "Query",
    "Request",
    "new_message_id",
]

R = TypeVar("R")


#: The longest span of time any setting or option takes, in seconds (about 31 years): a call's
#: deadline still fits its header, and a broker takes it as a TTL (in nanoseconds, for NATS).
MAX_TIMEOUT = 1e9
_IDS_PER_READ = 256
_ids: deque[str] = deque()  # ids read ahead from os.urandom; popleft and extend are thread-safe
os.register_at_fork(after_in_child=_ids.clear)  # a forked child must not hand out its parent's


#: What a message id may hold: 1-200 characters, none of them a control character (a newline would
#: forge a log line, an escape sequence would reach an operator's terminal).
MESSAGE_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"


def new_message_id() -> str:
    """A fresh message id: 32 hex characters (128 random bits), safe in any subject or key.

    What uuid4().hex holds, at a fraction of the cost: os.urandom is read for 256 ids at a time
    (a system call per message was half of an id's cost).
    """
    try:
        return _ids.popleft()
    except IndexError:
        block = os.urandom(16 * _IDS_PER_READ).hex()
        _ids.extend([block[i : i + 32] for i in range(32, len(block), 32)])
        return block[:32]


@dataclass(frozen=True, slots=True)
class Durable:
    """At-least-once delivery for a message type: set ``durable`` on the class.

        class PlaceOrder(Command[Order]):
            durable: ClassVar[Durable | bool] = True                      # CATGA_DURABLE_* defaults
        class OrderPlaced(Event):
            durable: ClassVar[Durable | bool] = Durable(attempts=8, backoff=(1, 10, 60))

    A field left None takes its ``CATGA_DURABLE_*`` default.

    Args:
        attempts: deliveries before the message is dead-lettered (a crash mid-handler counts).
        backoff: seconds between attempts, the last repeated (each with up to 20 % jitter).
        lease: seconds a node may go silent while running it before another node takes it over;
            a running handler renews it every third of it.
        dedup_window: seconds after a success during which the same message id is not run again.
    """

    attempts: int | None = None
    backoff: tuple[float, ...] | None = None
    lease: float | None = None
    dedup_window: float | None = None

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("Durable(attempts=...) needs at least 1")
        if self.backoff is not None and (
            not self.backoff or not all(0 <= delay <= MAX_TIMEOUT for delay in self.backoff)
        ):
            raise ValueError(f"Durable(backoff=...) needs one or more delays of 0 to {MAX_TIMEOUT:g} s")
        for name in ("lease", "dedup_window"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= MAX_TIMEOUT:
                raise ValueError(f"Durable({name}=...) must be more than 0 and at most {MAX_TIMEOUT:g} s")


@dataclass(frozen=True, slots=True)
class Accepted:
    """What `Mediator.enqueue` returns: the broker has stored the command."""

    message_id: str
    #: The broker already had a command with this id (a retried enqueue): it runs once.
    duplicate: bool = False


class Message(BaseModel):
    """Base of every message: an immutable pydantic model with an id and a wire type name.

    ``type_name`` is the name the message travels under; it defaults to the class name and must
    be the same on every node. Set it on the class to keep the wire name when renaming::

        class PlaceOrder(Command[str]):
            type_name: ClassVar[str] = "orders.place"
            sku: str

    ``message_id`` is the idempotency key: retries of one ``send`` keep it, and the idempotency
    behavior runs a handler once per id. Clients may pass their own.
    """

    model_config = ConfigDict(frozen=True)

    type_name: ClassVar[str] = "Message"
    #: `Durable` options (or True for the defaults): stored on the broker and run at least once.
    durable: ClassVar[Durable | bool] = False
    #: Handler runs of this type at once on one node (None: ``CATGA_MAX_IN_FLIGHT_PER_TYPE``); the
    #: node's ``CATGA_MAX_IN_FLIGHT`` still applies. Beyond it a node answers "busy" (`BusyError`).
    max_in_flight: ClassVar[int | None] = None

    #: No control characters: an id a client gave goes into logs, terminals and URLs as it is. Its
    #: wire name is pinned: an ``alias_generator`` (``to_camel``) would make it ``messageId``, which a
    #: node of another version reads as no id, and gives the message a new one.
    message_id: str = Field(
        default_factory=new_message_id,
        alias="message_id",
        min_length=1,
        max_length=200,
        pattern=MESSAGE_ID_PATTERN,
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        field = cls.model_fields["message_id"]
        if any(
            alias not in (None, "message_id")
            for alias in (field.alias, field.validation_alias, field.serialization_alias)
        ):
            # The idempotency key: retries of one send keep it only under the name every node reads.
            raise TypeError(f"{cls.__qualname__}.message_id must keep its wire name 'message_id' (no alias)")

    def routing_key(self) -> str | None:
        """The key consistent-hash routing uses (same key, same node while it lives).

        Override it to route, for instance, every message about one customer to one node.
        """
        return None


class Request(Message, Generic[R]):
    """A message handled by exactly one handler in the cluster, which returns ``R``."""

    @classmethod
    def result_adapter(cls) -> TypeAdapter[Any]:
        """The pydantic adapter that encodes and validates this request's result."""
        return _result_adapter(cls)


class Command(Request[R], Generic[R]):
    """A request that changes state; exactly one handler in the cluster, returning ``R``."""


class Query(Request[R], Generic[R]):
    """A request that reads state; exactly one handler in the cluster, returning ``R``."""


class Event(Message):
    """A fact that happened: every handler of it, on every live node, runs once."""


_REQUEST_BASES = (Request, Command, Query)
_UNSAID: Any = object()  # no base of a class says what its result is


@cache
def _result_adapter(cls: type[Request[Any]]) -> TypeAdapter[Any]:
    found = _result_type(cls)
    return TypeAdapter(Any if found is _UNSAID else found)


def _result_type(cls: type, given: dict[Any, Any] | None = None) -> Any:
    """The ``R`` of ``cls``'s `Request` base, with the type arguments its subclasses gave filled
    in: ``class Paged(Query[Page[T]], Generic[T])`` then ``class ListOrders(Paged[Order])`` returns
    ``Page[Order]``. ``given`` maps the type variables of ``cls`` to what a subclass set them to;
    each base gets its own map, so two bases may use one name. `_UNSAID` where no base says."""
    given = given or {}
    metadata = getattr(cls, "__pydantic_generic_metadata__", None)
    if not metadata:
        return _UNSAID
    if metadata["origin"] is not None:  # a parametrized class, ``Paged[Order]``: its origin's map
        origin = metadata["origin"]
        parameters = origin.__pydantic_generic_metadata__["parameters"]
        args = (_filled(arg, given) for arg in metadata["args"])
        return _result_type(origin, dict(zip(parameters, args, strict=False)))
    if cls in _REQUEST_BASES:
        found = given.get(R, Any)
        return Any if _open(found) else found
    for base in cls.__bases__:
        found = _result_type(base, given)
        if found is not _UNSAID:
            return found
    return _UNSAID


def _filled(tp: Any, given: dict[Any, Any]) -> Any:
    """``tp`` with the type variables that ``given`` knows replaced."""
    if isinstance(tp, TypeVar):
        return given.get(tp, tp)
    parameters = getattr(tp, "__parameters__", None)
    if not parameters or not isinstance(parameters, tuple):
        return tp
    try:
        return tp[tuple(given.get(parameter, parameter) for parameter in parameters)]
    except TypeError:  # a type that takes no arguments after all
        return tp


def _open(tp: Any) -> bool:
    """Whether ``tp`` still holds a type variable."""
    return isinstance(tp, TypeVar) or bool(getattr(tp, "__parameters__", None))

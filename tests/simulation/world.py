"""The simulated cluster: nodes on one in-memory broker and the virtual clock, and the ledger.

The ledger is what the invariants read: every call (who sent what, its deadline, how it ended),
every handler run (node, message, start, end, the deadline of the attempt that brought it) and
every handler error that reached a caller. The world only records; `invariants` judges.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi_catga import Catga, CatgaError, CatgaSettings, Message, Request, build
from fastapi_catga.cluster.routing import RoutingName
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport
from tests.simulation import messages
from tests.simulation.probes import Recorder, SimTransport, attempt_deadline
from tests.virtual_time import EPOCH

__all__ = ["Call", "Receipt", "Run", "SimNode", "World"]

HEARTBEAT = 1.0
TTL = 3.0
REQUEST_TIMEOUT = 3.0
DRAIN_TIMEOUT = 1.0
CLUSTER = "sim"

NodeState = Literal["starting", "live", "leaving", "stopped", "crashed", "failed"]


@dataclass(eq=False, slots=True)
class Run:
    """One handler run."""

    seq: int
    node: str
    message_id: str
    type_name: str
    started: float
    deadline: float | None  # of the attempt, in loop time; None for a run in the caller's task
    request: bool  # a command or query (not an event)
    ended: float | None = None
    end_seq: int = -1
    outcome: str = "running"  # "ok", "raised <Class>", "cancelled"


@dataclass(frozen=True, slots=True)
class Receipt:
    """A handler's own error reached its caller (as an error reply, or raised in the caller's task)."""

    seq: int
    at: float
    message_id: str
    node: str


@dataclass(eq=False)
class Call:
    """One mediator call the workload made."""

    index: int
    kind: str  # send, send_to_node, broadcast, publish
    origin: str
    message: Message
    started: float
    deadline: float
    timeout: float | None = None  # as passed to the mediator
    target: str | None = None
    window: int | None = None  # the calm routing window it started in (keyed sends only)
    end_window: int | None = None  # the routing window when it ended
    calm_at_end: bool = False
    ended: float | None = None
    outcome: str | None = None  # "ok", "error <Class>", "killed" or "BAD <what>"
    value: Any = None
    killed: bool = False  # its node crashed: no outcome is owed
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class SimNode:
    name: str
    catga: Catga
    transport: InMemoryTransport
    state: NodeState = "starting"
    paused: bool = False
    running: dict[asyncio.Task[Any], None] = field(default_factory=dict)  # handler runs in flight

    def view(self) -> list[str]:
        return [info.node_id for info in self.catga.node.nodes()]


class World:
    """The broker, the nodes and the ledger of one simulation run."""

    def __init__(self, routing: RoutingName) -> None:
        self.loop = asyncio.get_running_loop()
        self.broker = InMemoryBroker(clock=self.loop.time)
        self.routing: RoutingName = routing
        self.nodes: dict[str, SimNode] = {}
        self.calls: list[Call] = []
        self.calls_by_message: dict[str, Call] = {}
        self.runs: list[Run] = []
        self.runs_by_message: dict[str, list[Run]] = {}
        self.receipts: dict[str, list[Receipt]] = {}
        self.tasks: dict[asyncio.Task[Any], None] = {}  # the world's own: calls, joins, leaves
        self.trace: list[str] = []
        self.oddities: list[str] = []  # a start or stop that raised something other than a CatgaError
        self.step = 0
        self._seq = itertools.count()
        # Calm routing windows: every disturbance (a fault, a join or leave, a failed attempt)
        # opens a new window; see `routing_calm`.
        self.window = 0
        self.calm_since = 0.0
        # The last time a fault began or ended, or a node joined or left.
        self.last_fault = 0.0

    @property
    def now(self) -> float:
        return self.loop.time()

    def seq(self) -> int:
        return next(self._seq)

    def note(self, text: str) -> None:
        self.trace.append(f"{self.now:.6f} {text}")

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]

    # -- nodes ---------------------------------------------------------------------------------

    def add_node(self, name: str) -> SimNode:
        settings = CatgaSettings(
            transport="memory",
            cluster=CLUSTER,
            node_id=name,
            heartbeat_interval=HEARTBEAT,
            node_ttl=TTL,
            request_timeout=REQUEST_TIMEOUT,
            retry_attempts=3,
            routing=self.routing,
            drain_timeout=DRAIN_TIMEOUT,
            max_payload=1024 * 1024,
        )
        inner = InMemoryTransport(self.broker, cluster=CLUSTER)
        loop = self.loop
        catga = build(
            settings,
            handlers=[messages],
            behaviors=[Recorder(self, name)],
            transport=SimTransport(self, inner),
            clock=loop.time,
            wall_clock=lambda: EPOCH + loop.time(),
        )
        node = SimNode(name, catga, inner)
        self.nodes[name] = node
        return node

    def live(self) -> list[SimNode]:
        """Started, not crashed, not stopping or stopped (paused nodes are live)."""
        return [node for node in self.nodes.values() if node.state == "live"]

    def live_names(self) -> list[str]:
        return sorted(node.name for node in self.live())

    def views_converged(self) -> bool:
        expected = self.live_names()
        return all(sorted(node.view()) == expected for node in self.live())

    def faults_active(self) -> bool:
        return not self.broker.up or self.broker.frozen or any(n.paused for n in self.live())

    def routing_calm(self) -> bool:
        """Whether membership is stable for routing: no fault active, nobody joining or leaving, every
        view equal to the live set, and nothing disturbed routing for a heartbeat interval (a failed
        attempt makes its target suspect until its next heartbeat)."""
        return (
            self.now - self.calm_since >= HEARTBEAT + 0.1
            and not self.faults_active()
            and not any(node.state in ("starting", "leaving") for node in self.nodes.values())
            and self.views_converged()
        )

    def disturb(self, reason: str) -> None:
        self.window += 1
        self.calm_since = self.now
        self.note(f"disturbed: {reason}")

    def fault_changed(self, what: str) -> None:
        self.last_fault = self.now
        self.disturb(what)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = self.loop.create_task(work, name=name)
        self.tasks[task] = None
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        del self.tasks[task]

    # -- ledger --------------------------------------------------------------------------------

    def add_call(self, call: Call) -> None:
        self.calls.append(call)
        self.calls_by_message[call.message.message_id] = call
        where = f" to {call.target}" if call.target is not None else ""
        self.note(
            f"call {call.index} {call.kind} {_describe(call.message)} from {call.origin}{where} "
            f"timeout {call.timeout} deadline {call.deadline:.6f}"
        )

    def end_call(self, call: Call, outcome: str, value: Any = None) -> None:
        call.ended, call.outcome, call.value = self.now, outcome, value
        if call.window is not None:
            calm = self.routing_calm() and self.nodes[call.origin].state == "live"
            call.end_window, call.calm_at_end = self.window, calm
        self.note(f"call {call.index} ended {outcome} {_show(value)}")

    def start_run(self, node: str, message: Message) -> Run:
        run = Run(
            self.seq(),
            node,
            message.message_id,
            message.type_name,
            self.now,
            attempt_deadline.get(),
            request=isinstance(message, Request),
        )
        self.runs.append(run)
        self.runs_by_message.setdefault(run.message_id, []).append(run)
        self.note(f"run {node} {message.type_name} {message.message_id} started")
        return run

    def end_run(self, run: Run, outcome: str) -> None:
        run.ended, run.end_seq, run.outcome = self.now, self.seq(), outcome
        self.note(f"run {run.node} {run.message_id} {outcome}")
        if run.request and run.deadline is None and outcome.startswith("raised "):
            self.receive_error(run.message_id, run.node)  # raised in its caller's task

    def receive_error(self, message_id: str, node: str) -> None:
        self.receipts.setdefault(message_id, []).append(Receipt(self.seq(), self.now, message_id, node))
        self.note(f"caller received the handler error of {message_id} from {node}")


def _describe(message: Message) -> str:
    fields = message.model_dump(exclude={"message_id"})
    details = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{message.type_name} {message.message_id} {details}".rstrip()


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, CatgaError):
        return type(value).__name__
    return "" if value is None else str(value)

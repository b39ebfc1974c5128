"""The invariants of issue 7, checked against the world's ledger after every step.

1. Each call ends with a result or a `CatgaError` by its deadline (``timeout``, else the node's
   request timeout; a publish has no timeout of its own, so the request timeout too). A result is
   one a run of that message produced. Calls from a node that crashed owe nothing.
2. No handler starts after its attempt's deadline (the deadline in the envelope that brought it;
   for a run in the caller's task, the call's deadline).
3. A handler's own error runs it once: once the error a handler raised (anything but a
   `RetryableError`) has reached the caller, that message runs nowhere again (in a broadcast:
   not again on that node). Runs an attempt timeout gave up on may still end later.
4. A routing key runs on one node while membership is stable: among keyed sends that start and
   end in one calm window (`World.routing_calm`), each key runs on a single node.
5. Views converge to the live set within TTL + 1 s after faults stop: whenever no fault has begun
   or ended (and nobody joined or left) for TTL + 1 s, every live node's view is the live set.
6. No task is left pending after every node stops (checked by the runner at the end).

And one from DESIGN.md's reliability table, since the issue's list cannot see it:

7. No live node is evicted: once a live node has seen another live node, it keeps seeing it while
   both live. Live nodes here always heartbeat (a paused one too: only its deliveries wait), so
   only a lost or frozen broker silences them, and that must evict nobody.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi_catga import CatgaError
from tests.simulation.messages import OWN_ERRORS, Job, Lookup
from tests.simulation.world import TTL, Call, Receipt, Run, World

__all__ = [
    "DEADLINES",
    "ERRORS_RUN_ONCE",
    "KEYS_STICK",
    "LATE_STARTS",
    "NO_EVICTION",
    "NO_TASK_LEFT",
    "VIEWS_CONVERGE",
    "Invariants",
    "Violation",
]

DEADLINES = "each call ends with a result or a CatgaError by its deadline"
LATE_STARTS = "no handler starts after its attempt's deadline"
ERRORS_RUN_ONCE = "a handler's own error runs it once"
KEYS_STICK = "a routing key runs on one node while membership is stable"
VIEWS_CONVERGE = "views converge to the live set within TTL + 1 s after faults stop"
NO_TASK_LEFT = "no task left pending after every node stops"
NO_EVICTION = "no live node is evicted (a frozen or lost broker evicts nobody)"

EPSILON = 1e-3  # s: rounding of virtual time and of millisecond deadlines on the wire


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    step: int
    time: float
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} -- step {self.step}, t={self.time:.3f} s: {self.detail}"


class Invariants:
    """Checks the ledger incrementally: each call, run and receipt is judged once."""

    def __init__(self, world: World) -> None:
        self._world = world
        self._open: dict[int, Call] = {}
        self._calls_seen = 0
        self._runs_seen = 0
        self._oddities_seen = 0
        self._repeated: set[str] = set()  # messages already reported as run again
        self._owners: dict[tuple[int, str], dict[str, str]] = {}  # (window, key) -> node -> a message
        self._split_keys: set[tuple[int, str]] = set()
        self._quiet_checked = -1.0
        self._seen: dict[str, set[str]] = {}  # live node -> the live nodes it has seen
        self._evicted: set[tuple[str, str]] = set()

    def after_step(self) -> list[Violation]:
        return [
            *self._calls(),
            *self._runs(),
            *self._errors(),
            *self._evictions(),
            *self._views_when_quiet(),
        ]

    def violation(self, invariant: str, detail: str) -> Violation:
        return Violation(invariant, self._world.step, self._world.now, detail)

    # 1 and 4 -----------------------------------------------------------------------------------

    def _calls(self) -> list[Violation]:
        world, found = self._world, []
        for call in world.calls[self._calls_seen :]:
            self._open[call.index] = call
        self._calls_seen = len(world.calls)
        for oddity in world.oddities[self._oddities_seen :]:
            found.append(self.violation(DEADLINES, oddity))
        self._oddities_seen = len(world.oddities)
        for index, call in list(self._open.items()):
            if call.killed:
                del self._open[index]
            elif call.ended is not None:
                del self._open[index]
                found += self._ended(call)
            elif world.now > call.deadline + EPSILON:
                del self._open[index]
                found.append(
                    self.violation(
                        DEADLINES,
                        f"call {call.index} ({self._what(call)}) still running "
                        f"{world.now - call.deadline:.3f} s after its deadline",
                    )
                )
        return found

    def _ended(self, call: Call) -> list[Violation]:
        found = []
        assert call.ended is not None and call.outcome is not None
        if call.outcome.startswith("BAD"):
            found.append(
                self.violation(DEADLINES, f"call {call.index} ({self._what(call)}) ended {call.outcome}")
            )
        if call.ended > call.deadline + EPSILON:
            found.append(
                self.violation(
                    DEADLINES,
                    f"call {call.index} ({self._what(call)}) ended {call.outcome} "
                    f"{call.ended - call.deadline:.3f} s after its deadline",
                )
            )
        if call.outcome == "ok":
            found += self._result(call)
        if isinstance(call.message, Lookup) and call.window is not None:
            found += self._key_owner(call)
        return found

    def _result(self, call: Call) -> list[Violation]:
        runs = self._world.runs_by_message.get(call.message.message_id, ())
        ran_ok = {run.node for run in runs if run.outcome == "ok"}
        if call.kind == "publish":
            good = call.value is None
        elif call.kind == "broadcast":
            good = isinstance(call.value, dict) and all(
                isinstance(value, CatgaError) or (value == node and node in ran_ok)
                for node, value in call.value.items()
            )
        elif call.kind == "send_to_node":
            good = call.value == call.target and call.value in ran_ok
        else:
            good = call.value in ran_ok
        if good:
            return []
        return [
            self.violation(
                DEADLINES,
                f"call {call.index} ({self._what(call)}) returned {call.value!r}, which no run produced",
            )
        ]

    def _key_owner(self, call: Call) -> list[Violation]:
        if not (call.calm_at_end and call.end_window == call.window) or call.window is None:
            return []  # membership changed (or routing was disturbed) while it ran
        assert isinstance(call.message, Lookup)
        slot = (call.window, call.message.key)
        owners = self._owners.setdefault(slot, {})
        for run in self._world.runs_by_message.get(call.message.message_id, ()):
            owners.setdefault(run.node, f"{run.message_id} (call {call.index} from {call.origin})")
        if len(owners) < 2 or slot in self._split_keys:
            return []
        self._split_keys.add(slot)
        where = "; ".join(f"{node}: {message}" for node, message in owners.items())
        return [self.violation(KEYS_STICK, f"key {call.message.key} ran on {len(owners)} nodes: {where}")]

    def _what(self, call: Call) -> str:
        return _what(call, self._world.nodes[call.origin].state)

    # 2 -----------------------------------------------------------------------------------------

    def _runs(self) -> list[Violation]:
        world, found = self._world, []
        for run in world.runs[self._runs_seen :]:
            if run.type_name not in (Job.type_name, Lookup.type_name):
                continue
            call = world.calls_by_message.get(run.message_id)
            if run.deadline is not None:
                late, whose = run.started - run.deadline, "its attempt's deadline"
            elif call is not None:
                late, whose = run.started - call.deadline, "its call's deadline (run in the caller's task)"
            else:
                continue
            if late > EPSILON:
                found.append(
                    self.violation(
                        LATE_STARTS,
                        f"{run.type_name} {run.message_id} started on {run.node} {late:.3f} s after {whose}",
                    )
                )
        self._runs_seen = len(world.runs)
        return found

    # 3 -----------------------------------------------------------------------------------------

    def _errors(self) -> list[Violation]:
        world, found = self._world, []
        for message_id, receipts in world.receipts.items():
            call = world.calls_by_message.get(message_id)
            if message_id in self._repeated or call is None:
                continue
            if not (isinstance(call.message, Job) and call.message.mode in OWN_ERRORS):
                continue
            for run in world.runs_by_message.get(message_id, ()):
                before = [
                    r
                    for r in receipts
                    if r.seq < run.seq and (call.kind != "broadcast" or r.node == run.node)
                ]
                if before:
                    self._repeated.add(message_id)
                    found.append(
                        self.violation(
                            ERRORS_RUN_ONCE, _rerun(f"call {call.index} ({self._what(call)})", run, before[0])
                        )
                    )
                    break
        return found

    # 7 -----------------------------------------------------------------------------------------

    def _evictions(self) -> list[Violation]:
        world, found = self._world, []
        live = set(world.live_names())
        for node in world.live():
            view = set(node.view())
            seen = self._seen.setdefault(node.name, set())
            seen &= live
            for lost in sorted(seen - view):
                if (node.name, lost) not in self._evicted:
                    self._evicted.add((node.name, lost))
                    state = "frozen" if world.broker.frozen else "up" if world.broker.up else "down"
                    found.append(
                        self.violation(
                            NO_EVICTION, f"{node.name} evicted {lost}, which is live (broker {state})"
                        )
                    )
            seen |= view & live
        return found

    # 5 -----------------------------------------------------------------------------------------

    def _views_when_quiet(self) -> list[Violation]:
        world = self._world
        quiet = world.now - world.last_fault >= TTL + 1.0
        if not quiet or world.last_fault == self._quiet_checked or world.faults_active():
            return []
        if any(node.state in ("starting", "leaving") for node in world.nodes.values()):
            return []
        self._quiet_checked = world.last_fault
        return self.views()

    def views(self) -> list[Violation]:
        """Every live node's view against the live set, now."""
        world = self._world
        expected = world.live_names()
        wrong = [
            f"{node.name} sees {sorted(node.view())}"
            for node in world.live()
            if sorted(node.view()) != expected
        ]
        if not wrong:
            return []
        since = world.now - world.last_fault
        return [
            self.violation(
                VIEWS_CONVERGE,
                f"{since:.3f} s after the last fault, live set {expected}, but " + "; ".join(wrong),
            )
        ]


def _what(call: Call, origin_state: str) -> str:
    message = call.message
    text = f"{call.kind} {message.type_name} {message.message_id} from {call.origin} (now {origin_state})"
    if call.target is not None:
        text += f" to {call.target}"
    if isinstance(message, Job):
        text += f", mode {message.mode}, delay {message.delay} s"
    return text + f", timeout {call.timeout}, deadline {call.deadline:.3f}"


def _rerun(what: str, run: Run, receipt: Receipt) -> str:
    return (
        f"{what}: the handler's error from {receipt.node} reached the "
        f"caller at t={receipt.at:.3f}, then it ran again on {run.node} at t={run.started:.3f}"
    )

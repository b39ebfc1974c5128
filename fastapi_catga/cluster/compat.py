"""Which peers can take which message types from this node, by the schemas their records advertise
(the rule is in `fastapi_catga.core.schemas`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi_catga.core.handlers import check_type_name
from fastapi_catga.core.messages import Event, Message
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.schemas import TypeSchema, problems, schema_of
from fastapi_catga.exceptions import IncompatibleSchemaError

__all__ = ["SchemaCheck"]

logger = logging.getLogger(__name__)

#: How a cached verdict names the peer, replaced by the peer's name when read. A field name shows
#: in a reason only by its ``repr``, which never holds a raw NUL, so nothing else can match it.
_PEER = "\0"


class SchemaCheck:
    """This node's message schemas, and their comparison with each peer's.

    This node knows the schema of every type it handles, and of every type it has sent (`learn`).
    A peer whose record has no schema for a type (an older fastapi-catga) counts as compatible:
    nothing says otherwise. Each (peer, type) found incompatible is logged once, as a warning.

    Args:
        local: the message classes this node handles.
    """

    def __init__(self, local: Iterable[type[Message]] = ()) -> None:
        self._local: dict[str, TypeSchema] = {}
        self._classes: dict[str, type[Message]] = {}
        for message_type in local:
            self.learn(message_type)
        # Comparisons are pure: cached by both schemas compared (few distinct ones per type), with
        # the peer named by `_PEER`, so every peer that runs the same schema shares one verdict.
        self._verdicts: dict[tuple[str, str, str], tuple[str, ...]] = {}
        # (peer, type, its schema there, this node's): each incompatible pair is logged once.
        self._warned: set[tuple[str, str, str, str]] = set()

    def learn(self, message_type: type[Message]) -> bool:
        """Note a class this node sends; True when its schema is new here (routes must be redone).

        Raises:
            ConfigurationError: its ``type_name`` is none a handler could register (`check_type_name`).
        """
        name = message_type.type_name
        if self._classes.get(name) is message_type:
            return False
        check_type_name(message_type)  # one a handler could register: every broker carries it
        self._classes[name] = message_type
        schema = schema_of(message_type)
        if schema is None:
            self._local.pop(name, None)
        else:
            self._local[name] = schema
        return True

    def problems(self, node: NodeInfo, type_name: str) -> tuple[str, ...]:
        """Why this node may not send ``type_name`` to ``node`` (empty: it may)."""
        mine = self._local.get(type_name)
        text = node.schemas.get(type_name)
        if mine is None or text is None or text == mine.text:
            return ()
        key = (type_name, mine.text, text)
        cached = self._verdicts.get(key)
        if cached is None:
            cached = self._verdicts[key] = _compare(mine, text)
        if not cached:
            return ()
        peer = f"node {node.node_id}"
        verdict = tuple(reason.replace(_PEER, peer) for reason in cached)
        warned = (node.node_id, type_name, text, mine.text)
        if warned not in self._warned:
            self._warned.add(warned)
            consequence = (
                "events of it published here may fail to decode there"
                if issubclass(self._classes[type_name], Event)
                else "this node does not send it there"
            )
            logger.warning(
                "node %s%s has an incompatible %s schema (%s): %s",
                node.node_id,
                _version(node.app_version),
                type_name,
                consequence,
                "; ".join(verdict),
            )
        return verdict

    def incompatibilities(self, node: NodeInfo) -> dict[str, str]:
        """Every type both nodes know whose schemas are incompatible, with what differs."""
        found = {name: self.problems(node, name) for name in sorted(node.schemas)}
        return {name: "; ".join(reasons) for name, reasons in found.items() if reasons}

    def forget(self, node_id: str) -> None:
        """A node left: its warnings may be logged again if the id comes back with other schemas."""
        self._warned = {key for key in self._warned if key[0] != node_id}

    def error(self, type_name: str, nodes: list[NodeInfo]) -> IncompatibleSchemaError | None:
        """The error for a send whose capable nodes are all incompatible; None if one is not."""
        refused = {node.node_id: self.problems(node, type_name) for node in nodes}
        if not refused or not all(refused.values()):
            return None
        versions = {node.node_id: node.app_version for node in nodes}
        described = "; ".join(
            f"{node_id}{_version(versions[node_id])}: {', '.join(reasons)}"
            for node_id, reasons in refused.items()
        )
        return IncompatibleSchemaError(
            f"no node with a compatible {type_name} schema: the nodes that handle it run another "
            f"version of it ({described}). Deploy the change in compatible steps (new fields with "
            "defaults), or let the nodes of this version handle it",
            node_id=next(iter(refused)),
            details={node_id: list(reasons) for node_id, reasons in refused.items()},
        )


def _compare(mine: TypeSchema, text: str) -> tuple[str, ...]:
    """The reasons this node's schema and the peer's ``text`` are incompatible, the peer named by
    `_PEER`; empty when compatible."""
    try:
        theirs = TypeSchema.decode(text)
    except ValueError:  # a record this version cannot read: let the far side judge the message
        return ()
    return tuple(problems(mine, theirs, _PEER))


def _version(app_version: str) -> str:
    return f" (app {app_version})" if app_version else ""

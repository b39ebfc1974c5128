"""The public API: ``__all__``, CONTRACT.md's names, the error tree as drawn, ``py.typed``."""

from __future__ import annotations

import builtins
import re
from pathlib import Path
from types import ModuleType

import pytest

import fastapi_catga
from fastapi_catga import exceptions

CONTRACT_NAMES = [
    "Command",
    "Query",
    "Event",
    "handler",
    "Mediator",
    "NodeInfo",
    "CatgaSettings",
    "catga_lifespan",
    "catga_router",
    "get_mediator",
    "CatgaError",
    "HandlerNotFoundError",
    "NodeUnavailableError",
    "RequestTimeoutError",
    "RemoteHandlerError",
    "MessageValidationError",
    "MessageTooLargeError",
    "TransportError",
]

#: ``├── Name (Builtin)`` lines of the tree in exceptions.py's docstring, with their depth.
TREE_LINE = re.compile(r"^(?P<indent>(?:[│ ] {3})*)[├└]── (?P<name>\w+)(?: \((?P<builtin>\w+)\))?")


def drawn_tree() -> list[tuple[int, str, str | None]]:
    doc = exceptions.__doc__ or ""
    return [
        (len(m["indent"]) // 4 + 1, m["name"], m["builtin"])
        for m in map(TREE_LINE.match, doc.splitlines())
        if m is not None
    ]


def public_names() -> list[str]:
    return [
        name
        for name, value in vars(fastapi_catga).items()
        if (not name.startswith("_") or name == "__version__") and not isinstance(value, ModuleType)
    ]


def test_all_is_sorted_case_insensitively() -> None:
    assert fastapi_catga.__all__ == sorted(fastapi_catga.__all__, key=str.casefold)


def test_all_is_exactly_the_public_names() -> None:
    assert sorted(fastapi_catga.__all__) == sorted(public_names())
    assert len(set(fastapi_catga.__all__)) == len(fastapi_catga.__all__)


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_are_importable(name: str) -> None:
    assert name in fastapi_catga.__all__
    assert getattr(fastapi_catga, name) is not None


def test_contract_errors_derive_from_catga_error() -> None:
    for name in CONTRACT_NAMES[CONTRACT_NAMES.index("HandlerNotFoundError") :]:
        assert issubclass(getattr(fastapi_catga, name), fastapi_catga.CatgaError), name


def test_every_error_class_matches_the_drawn_tree() -> None:
    tree = drawn_tree()
    assert len(tree) >= 10, "the tree in exceptions.py's docstring did not parse"
    parents: dict[int, type[BaseException]] = {0: exceptions.CatgaError}
    for depth, name, builtin in tree:
        cls = getattr(exceptions, name)
        assert issubclass(cls, parents[depth - 1]), f"{name} should subclass {parents[depth - 1].__name__}"
        if builtin is not None:
            assert issubclass(cls, getattr(builtins, builtin)), f"{name} should subclass {builtin}"
        parents[depth] = cls
        assert getattr(fastapi_catga, name) is cls, f"{name} is not exported from fastapi_catga"


def test_every_exported_error_class_is_drawn() -> None:
    drawn = {name for _, name, _ in drawn_tree()}
    exported = {
        name
        for name in exceptions.__all__
        if isinstance(getattr(exceptions, name), type) and name != "CatgaError"
    }
    assert exported <= drawn


def test_builtin_parents_let_plain_except_clauses_catch_them() -> None:
    with pytest.raises(LookupError):
        raise fastapi_catga.HandlerNotFoundError("x")
    with pytest.raises(TimeoutError):
        raise fastapi_catga.RequestTimeoutError("x")
    with pytest.raises(ConnectionError):
        raise fastapi_catga.NodeUnavailableError("x")
    with pytest.raises(ValueError):
        raise fastapi_catga.MessageTooLargeError("x")


def test_package_ships_py_typed() -> None:
    assert (Path(fastapi_catga.__file__).parent / "py.typed").is_file()


def test_version_is_a_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", fastapi_catga.__version__)

"""One error hierarchy; each class maps to one CLI exit code."""
from __future__ import annotations

__all__ = [
    "BadInputError",
    "GraphpruneError",
    "OverLimitError",
    "PlanMismatchError",
    "UnsupportedOpError",
    "ValidationError",
    "short_message",
]


class GraphpruneError(Exception):
    """Base of every error graphprune raises on purpose."""

    exit_code: int = 1


class BadInputError(GraphpruneError):
    """The user's file, option or plan cannot be used (exit 2)."""

    exit_code = 2


class PlanMismatchError(BadInputError):
    """A plan was made for another model than the one given (exit 2)."""


class UnsupportedOpError(BadInputError):
    """The model holds ops that graphprune cannot execute in torch (exit 2)."""


class ValidationError(GraphpruneError):
    """The pruned model failed validation; nothing was written (exit 3)."""

    exit_code = 3


class OverLimitError(GraphpruneError):
    """The target is beyond the estimated maximum compression rate (exit 4)."""

    exit_code = 4


def short_message(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]

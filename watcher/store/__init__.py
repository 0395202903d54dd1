"""The SQLite store: the only package that talks to the database (through sqlite-utils)."""

from .core import BLOCK_WINDOW, Deriver, OptionFinisher, SessionPlanner, Store
from .outbox import Endpoint, Outbox
from .records import (
    ApplyResult,
    IdempotencyConflict,
    MatchedTransfer,
    NewInvoice,
    NewSession,
    OptionSpec,
    StateConflict,
)

__all__ = [
    "BLOCK_WINDOW",
    "ApplyResult",
    "Deriver",
    "Endpoint",
    "IdempotencyConflict",
    "MatchedTransfer",
    "NewInvoice",
    "NewSession",
    "OptionFinisher",
    "OptionSpec",
    "Outbox",
    "SessionPlanner",
    "StateConflict",
    "Store",
]

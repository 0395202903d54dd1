"""The SQLite store: the only package that talks to the database (through sqlite-utils)."""

from .core import BLOCK_WINDOW, Deriver, OptionFinisher, Store
from .outbox import Endpoint, Outbox
from .records import (
    ApplyResult,
    IdempotencyConflict,
    MatchedTransfer,
    NewInvoice,
    OptionSpec,
    StateConflict,
)

__all__ = [
    "BLOCK_WINDOW", "ApplyResult", "Deriver", "Endpoint", "IdempotencyConflict", "MatchedTransfer",
    "NewInvoice", "OptionFinisher", "OptionSpec", "Outbox", "StateConflict", "Store",
]

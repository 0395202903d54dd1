"""Where prices come from: each source reads once per call and says what it read, or why it
must not quote (`Refused`), or that it could not read (`SourceFailed`)."""

from .base import Reading, Refused, Source, SourceFailed, value_problem

__all__ = ["Reading", "Refused", "Source", "SourceFailed", "value_problem"]

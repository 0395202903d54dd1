"""watcher: watches EVM chains for invoice payments."""

__version__ = "0.1.0"

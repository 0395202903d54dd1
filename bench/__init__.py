"""Catch-up benchmark of the watcher against a raw JSON-RPC client and web3.py (see README.md)."""

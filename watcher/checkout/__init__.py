"""The hosted payment page (contract section 8): a public listener of its own that serves the
page, its live status and its assets, reading invoices through the store."""

from .feed import Feed
from .routes import make_checkout_app

__all__ = ["Feed", "make_checkout_app"]

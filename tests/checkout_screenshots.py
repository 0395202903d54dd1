"""Screenshots of the payment page's main states, on a phone and on a desktop, for the docs:

    .venv/bin/python tests/checkout_screenshots.py [OUT_DIR]      # default docs/checkout/

The real daemon on the sandbox chain and a real headless Chromium, as in the browser tests:
each state is reached by real payments (and chain time travel for the expired one).
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import Browser  # noqa: E402
from checkout_harness import CheckoutHarness  # noqa: E402
from test_e2e_rules import travel_past_deadline  # noqa: E402

SIZES = {"phone": (360, 740), "desktop": (1280, 860)}


def _small_png(png: bytes) -> bytes:
    """A palette PNG: a page of flat colours loses nothing visible and shrinks several-fold."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


async def shoot(browser: Browser, url: str, name: str, out: Path, screen: str) -> None:
    for size, (width, height) in SIZES.items():
        await browser.reset(width=width, height=height, wallet=True)
        await browser.open(url)
        await browser.wait(
            lambda: browser.js(
                f"return document.getElementById('checkout').dataset.screen === '{screen}'"
                " && document.readyState === 'complete';"
            ),
            what=f"{name} on screen",
        )
        await asyncio.sleep(0.5)  # the script's first run: countdown, copy and wallet buttons
        png = await browser.full_page_png(width)
        (out / f"{name}-{size}.png").write_bytes(_small_png(png))
        print(f"{out / f'{name}-{size}.png'}")


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    browser = await asyncio.to_thread(Browser)
    h = CheckoutHarness(Path(tempfile.mkdtemp(prefix="watcher-shots-")))
    await h.start()
    try:
        waiting = await h.create(
            amount="49.99",
            product_name="Pro Plan - Monthly",
            quote_rates={"ETH": "3150.25"},
            assets=["TUSD", "ETH"],
        )
        await shoot(browser, waiting["checkout_url"], "waiting", out, "waiting")

        partial = await h.create(amount="49.99", product_name="Pro Plan - Monthly")
        await h.pay(partial["id"], amount="20")
        await h.mine(1)
        await h.wait_invoice(
            partial["id"], lambda i: i["payment_summary"]["payment_state"] == "partial", "partial"
        )
        await shoot(browser, partial["checkout_url"], "partly-paid", out, "partial")

        seen = await h.create(
            amount="49.99",
            product_name="Pro Plan - Monthly",
            # (a local URL: the browser goes there 4 s after "confirmed", and has no internet here)
            redirect_url=h.public_url + "/orders/123",
        )
        await h.pay(seen["id"])
        await h.mine(1)
        await h.wait_status(seen["id"], "paid")
        await shoot(browser, seen["checkout_url"], "seen", out, "paid")
        await h.mine(3)
        await h.wait_status(seen["id"], "confirmed")
        await shoot(browser, seen["checkout_url"], "confirmed", out, "confirmed")

        expired = await h.create(amount="49.99", product_name="Pro Plan - Monthly")
        await travel_past_deadline(h, expired)
        await h.wait_status(expired["id"], "expired")
        # A fresh browser: the confirmed page's redirect (4 s after it showed) can fire while the
        # driver navigates, after which chromedriver's next page load times out at once.
        await asyncio.to_thread(browser.quit)
        browser = await asyncio.to_thread(Browser)
        await shoot(browser, expired["checkout_url"], "expired", out, "expired")
    finally:
        await h.close()
        await asyncio.to_thread(browser.quit)


if __name__ == "__main__":
    target = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "docs" / "checkout"
    )
    asyncio.run(main(target))

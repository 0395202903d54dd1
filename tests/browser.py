"""A real headless Chromium (Debian's `chromium` and `chromium-driver`) driven by selenium, for
the payment page's tests and its screenshots, plus an EIP-1193 provider injected into every
page whose requests the test answers (forwarding them to a node).

Selenium blocks; the daemon under test runs on the test's event loop, so every browser call
goes through `Browser.call` (a worker thread) and the loop keeps serving the page meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)

# window.ethereum for the page: each request waits in a queue the test empties and answers.
PROVIDER = """
(function () {
  var pending = {}, queue = [], next = 1;
  window.__rpcBridge = {
    take: function () { var q = queue; queue = []; return q; },
    answer: function (id, result, error) {
      var p = pending[id]; delete pending[id];
      if (!p) { return; }
      if (error) { var e = new Error(error.message); e.code = error.code; p.reject(e); }
      else { p.resolve(result); }
    }
  };
  window.ethereum = {
    request: function (args) {
      return new Promise(function (resolve, reject) {
        var id = next++;
        pending[id] = { resolve: resolve, reject: reject };
        queue.push({ id: id, method: args.method, params: args.params || [] });
      });
    },
    on: function () {}, removeListener: function () {}
  };
})();
"""


def available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


class Browser:
    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="watcher-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)
        self._provider_script: str | None = None

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def cdp(self, command: str, params: dict) -> Any:
        return await self.call(self.driver.execute_cdp_cmd, command, params)

    # ------------------------------------------------------------------ per-test setup

    async def reset(
        self,
        *,
        width: int = 1280,
        height: int = 900,
        accept_language: str = "en",
        javascript: bool = True,
        wallet: bool = False,
    ) -> None:
        """A clean state for the next page: size, language, JavaScript, and the injected wallet."""
        await self.call(self.driver.get, "about:blank")
        await self.cdp(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        await self.cdp("Network.enable", {})
        await self.cdp("Network.setExtraHTTPHeaders", {"headers": {"Accept-Language": accept_language}})
        await self.cdp("Emulation.setScriptExecutionDisabled", {"value": not javascript})
        if self._provider_script is not None:
            await self.cdp("Page.removeScriptToEvaluateOnNewDocument", {"identifier": self._provider_script})
            self._provider_script = None
        if wallet:
            added = await self.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": PROVIDER})
            self._provider_script = added["identifier"]
        await self.call(self.driver.get_log, "browser")  # drop what earlier pages logged

    async def open(self, url: str) -> None:
        from selenium.common.exceptions import TimeoutException

        try:
            await self.call(self.driver.get, url)
        except TimeoutException as exc:
            raise AssertionError(f"{url} did not load: {exc.msg}") from None

    async def text(self, css: str) -> str:
        return await self.js(
            f"var e = document.querySelector({css!r}); return e ? e.textContent.trim() : null;"
        )

    async def screen(self) -> str | None:
        return await self.js(
            "var m = document.getElementById('checkout'); return m ? m.dataset.screen : null;"
        )

    async def wait(
        self,
        check: Callable[[], Any],
        *,
        timeout: float = 20.0,
        what: str = "condition",
        between: Callable[[], Any] | None = None,
    ) -> Any:
        """Until `check()` (async) is truthy; `between()` (async) runs each round (the wallet bridge)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = None
        while loop.time() < deadline:
            if between is not None:
                await between()
            last = await check()
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")

    async def logs(self) -> list[dict]:
        return await self.call(self.driver.get_log, "browser")

    async def png(self, css: str | None = None) -> bytes:
        if css is None:
            return await self.call(self.driver.get_screenshot_as_png)
        from selenium.webdriver.common.by import By

        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        return await self.call(lambda: element.screenshot_as_png)

    async def full_page_png(self, width: int) -> bytes:
        """The whole page, however long, at `width` CSS pixels."""
        height = await self.js("return Math.ceil(document.documentElement.scrollHeight);")
        await self.cdp(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": width < 600},
        )
        return await self.png()


class WalletBridge:
    """Answers the injected provider's requests the way a wallet on `node` would: accounts are
    the node's unlocked dev accounts, transactions are sent by the node (and a block mined, so
    the page's wait for an approval's receipt ends). `refuse` answers every request with that
    EIP-1193 error instead."""

    def __init__(
        self,
        browser: Browser,
        rpc: Callable[..., Any],
        chain_id: int,
        mine: Callable[[], Any],
        refuse: dict | None = None,
        wallet_chain_id: int | None = None,
        knows_chain: bool = True,
    ) -> None:
        self.browser = browser
        self.rpc = rpc
        self.chain_id = chain_id  # the node's
        self.wallet_chain_id = (
            chain_id if wallet_chain_id is None else wallet_chain_id
        )  # where the wallet stands
        self.knows_chain = knows_chain  # whether it can switch to the node's chain
        self.mine = mine
        self.refuse = refuse
        self.seen: list[str] = []
        self.sent: list[dict] = []

    async def serve(self) -> None:
        requests = await self.browser.js("return window.__rpcBridge ? window.__rpcBridge.take() : [];") or []
        for request in requests:
            self.seen.append(request["method"])
            result, error = await self._answer(request["method"], request["params"])
            await self.browser.js(
                "window.__rpcBridge.answer(arguments[0], arguments[1], arguments[2]);",
                request["id"],
                result,
                error,
            )

    async def _answer(self, method: str, params: list) -> tuple[Any, dict | None]:
        if self.refuse is not None:
            return None, self.refuse
        if method == "eth_requestAccounts":
            return (await asyncio.to_thread(self.rpc, "eth_accounts"))[:1], None
        if method == "eth_chainId":
            return hex(self.wallet_chain_id), None
        if method == "wallet_switchEthereumChain":
            if int(params[0]["chainId"], 16) == self.chain_id and self.knows_chain:
                self.wallet_chain_id = self.chain_id
                return None, None
            return None, {"code": 4902, "message": "Unrecognized chain ID"}
        if self.wallet_chain_id != self.chain_id:
            return None, {"code": -32603, "message": "the wallet is on another chain"}
        if method == "eth_sendTransaction":
            self.sent.append(params[0])
            tx = await asyncio.to_thread(self.rpc, "eth_sendTransaction", params[0])
            await self.mine()
            return tx, None
        if method in ("eth_getTransactionReceipt", "eth_accounts"):
            return await asyncio.to_thread(self.rpc, method, *params), None
        return None, {"code": 4200, "message": f"unsupported method {method}"}

"""The daemon with its payment page on a public listener of its own, for the checkout tests."""

from __future__ import annotations

from typing import Any

import aiohttp
from harness import Harness, free_port

from watcher.config import settings_from_dict


class CheckoutHarness(Harness):
    """`checkout` settings beyond the defaults go in `checkout_extra` (a subclass or the instance)."""

    checkout_extra: dict[str, Any] = {}
    brand_name = "Acme, Inc."

    def settings(self):
        base = super().settings()
        port = free_port()
        data = base.model_dump(exclude={"http", "webhooks"})
        data["http"] = {"listen": base.http.listen, "api_key_env": "API_KEY"}
        data["webhooks"] = [
            {"url": w.url, "secret_env": "HOOK_SECRET", "events": list(w.events)} for w in base.webhooks
        ]
        data["checkout"] = {
            "listen": f"127.0.0.1:{port}",
            "public_base_url": f"http://127.0.0.1:{port}",
            "brand_name": self.brand_name,
            **self.checkout_extra,
        }
        return settings_from_dict(data, env={"API_KEY": self.api_key, "HOOK_SECRET": self.receiver.secret})

    @property
    def public_url(self) -> str:
        assert self.service is not None
        return self.service.checkout_url

    async def public(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
        """GET on the public listener: (status, body text, headers)."""
        assert self.http is not None
        async with self.http.get(self.public_url + path, headers=headers or {}, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers


async def read_sse(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The next Server-Sent Event of a stream as its fields (`id`, `event`, `data`, `retry`)."""
    fields: dict[str, str] = {}
    while True:
        line = (await response.content.readline()).decode().rstrip("\r\n")
        if line == "" and fields:
            return fields
        if line.startswith(":") or line == "":
            continue
        name, _, value = line.partition(":")
        fields[name] = fields.get(name, "") + value.removeprefix(" ")

"""The QR code of a payment URI, as inline SVG made on the server (no script, no other origin)."""

from __future__ import annotations

import io
from functools import lru_cache

import segno


@lru_cache(maxsize=1024)
def qr_svg(data: str, label: str) -> str:
    """An `<svg>` element to put straight into the page: no XML declaration and no namespace
    (inline SVG in HTML needs neither), a viewBox so CSS sizes it, a white quiet zone so
    phones read it on a dark screen, and `label` as its accessible name."""
    code = segno.make(data, error="m", micro=False)
    out = io.BytesIO()
    code.save(
        out,
        kind="svg",
        xmldecl=False,
        svgns=False,
        nl=False,
        omitsize=True,
        scale=1,
        border=4,
        dark="#000",
        light="#fff",
        svgclass="qr",
        lineclass=None,
        title=label,
    )
    svg = out.getvalue().decode()
    return svg.replace("<svg ", '<svg role="img" focusable="false" ', 1)

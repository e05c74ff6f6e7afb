"""The self-contained HTML page of `toolkit view`: the view data as JSON inside one file with its
script and style (toolkit/render/view/), so that it opens from disk with no network request."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from toolkit.render.scales import NOISE_FLOOR

ASSETS = Path(__file__).resolve().parent / "view"
SIGNIFICANT_DIGITS = 5  # the page shows 4; five keep a 60-step MiniLM run under 1 MB


def render_view_html(data: dict) -> str:
    """The page for `data` (from `toolkit.analysis.view_data`), as one HTML string."""
    # the page's colour scales read the noise floor from the data: one value, set in Python
    page_data = {**data, "noise_floor": NOISE_FLOOR}
    payload = json.dumps(rounded(page_data), separators=(",", ":"), allow_nan=False)
    parts = {
        "title": _escape(data["title"]),
        "style": (ASSETS / "view.css").read_text(),
        "script": (ASSETS / "view.js").read_text(),
        # "</" inside a <script> element would end it early; "<\/" is the same string to JSON.
        "data": payload.replace("</", "<\\/"),
    }
    # one pass: text put in (a title, a user's sentence) is never read as a placeholder
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], (ASSETS / "page.html").read_text())


def rounded(value: object, digits: int = SIGNIFICANT_DIGITS) -> object:
    """`value` with every float kept to `digits` significant digits; NaN and infinity become
    None (JSON has neither)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

"""Server-Sent Events framing for OpenAI streams: one `data: <json>` event per chunk, then `data: [DONE]`."""
from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer a token stream
}


def event(obj: Any) -> bytes:
    """One event. orjson never emits raw newlines, so a single data line is always enough."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def parse(raw: bytes) -> list[bytes]:
    """The data payloads of a complete SSE byte stream (tests and the benchmark read streams with it).

    Strict: every event must be exactly one `data: ` line followed by a blank line."""
    if not raw.endswith(b"\n\n"):
        raise ValueError(f"stream does not end with a blank line: {raw[-40:]!r}")
    out = []
    for block in raw[:-2].split(b"\n\n"):
        if not block.startswith(b"data: ") or b"\n" in block:
            raise ValueError(f"malformed SSE event: {block[:80]!r}")
        out.append(block[len(b"data: "):])
    return out

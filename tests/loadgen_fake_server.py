"""A tiny OpenAI-style SSE completions server that emits tokens at scripted times (for the load tester's tests).

It runs its own event loop in a background thread, so a test can drive the client with asyncio.run
or through the CLI's main(). Timing: a request's first token leaves `first` seconds after the
request starts being served, then one token every `gap` seconds. With `service` set, requests
are served FIFO one at a time for `service` seconds each before their first token (a prefill
queue), so TTFT grows with load exactly as hand-computed; decoding never blocks the queue.

The behaviour of a request is chosen by its prompt's first token id, or by text "mode:N" (other text: normal):
  1 normal   2 HTTP 500   3 hang   4 no usage chunk   5 error event mid-stream   6 connection cut mid-stream
POST /v1/chat/completions streams like vLLM: a role-only chunk at once, then content deltas (mode from the
last message's text).
"""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

NORMAL, HTTP_500, HANG, NO_USAGE, ERROR_EVENT, CUT = 1, 2, 3, 4, 5, 6


class FakeServer:
    def __init__(self, first: float = 0.1, gap: float = 0.02, service: float | None = None) -> None:
        self.first, self.gap, self.service = first, gap, service
        self.bodies: list[dict] = []
        self._busy_until = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None  # releases hanging handlers at exit
        self.url = ""

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stopping.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        body = await request.json()
        self.bodies.append(body)
        chat = request.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if isinstance(prompt, str):
            mode = int(prompt.split(":")[1]) if prompt.startswith("mode:") else NORMAL
        else:
            mode = prompt[0]
        if mode == HTTP_500:
            return web.Response(status=500, text="boom")
        if self.service is None:
            first_at = arrival + self.first
        else:  # FIFO prefill queue
            start = max(arrival, self._busy_until)
            self._busy_until = start + self.service
            first_at = start + self.service
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # the role arrives before any token: it must not count as the first token
            await _send(resp, {"id": "c", "object": "chat.completion.chunk", "model": body["model"],
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
        if mode == HANG:
            await self._stopping.wait()
            return resp
        n = body["max_tokens"]
        for j in range(n):
            await asyncio.sleep(max(0.0, first_at + j * self.gap - loop.time()))
            if mode == ERROR_EVENT and j == 1:
                await _send(resp, {"error": {"message": "engine died", "type": "internal"}})
                break
            if mode == CUT and j == 1:
                request.transport.close()
                return resp
            finish = "length" if j == n - 1 else None
            if chat:
                choice = {"index": 0, "delta": {"content": f" t{j}"}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": f" t{j}", "finish_reason": finish}
            await _send(resp, {"id": "c", "object": "text_completion", "model": body["model"], "choices": [choice]})
        if mode != NO_USAGE:
            await _send(resp, {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}})
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _send(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

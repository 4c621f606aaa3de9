"""The live dashboard, in a real headless browser (Debian's chromium; skipped when it is absent, CI installs it).

The page is served by the app around a real engine (disaggregated, the bundled model); the browser is driven over
the DevTools protocol: the page loads with nothing outside the machine, its numbers change as requests finish,
and a screenshot lands in the test's tmp directory.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.config import CacheConfig, EngineConfig
from server import ServerConfig, create_app
from serving.engine import AsyncEngine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
         "--remote-debugging-port=0"]


class AppThread:
    """The app on its own event loop in a background thread, listening on a free loopback port."""

    def __init__(self, app: web.Application) -> None:
        self.app, self.loop = app, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        self.runner = web.AppRunner(self.app)
        self.call(self.runner.setup())
        self.call(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Page:
    """One browser tab over the DevTools protocol: evaluate JavaScript, take screenshots."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        await self.ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg["result"]

    async def eval(self, expr: str):
        r = await self.send("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")

    async def wait_for(self, expr: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (value := await self.eval(expr)):
            assert time.monotonic() < deadline, f"timed out waiting for {expr}"
            await asyncio.sleep(0.2)
        return value


async def _devtools_page(profile: Path, url: str) -> tuple[aiohttp.ClientSession, Page]:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline, "chromium did not open its DevTools port"
        await asyncio.sleep(0.1)
    port = port_file.read_text().split()[0]
    session = aiohttp.ClientSession()
    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
        targets = await r.json()
    target = next(t for t in targets if t["type"] == "page" and t["url"].startswith(url))
    return session, Page(await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))


TEXT = "document.getElementById({!r}).textContent"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_dashboard_updates_live_in_a_real_browser(ckpt, tmp_path):
    cfg = EngineConfig(mode="disagg", prefill_devices=["cpu"], decode_devices=["cpu"], dtype="float32",
                       cache=CacheConfig(num_blocks=64))
    app = create_app(AsyncEngine(cfg, checkpoint=ckpt), ServerConfig(slo_ttft=5.0, slo_tpot=1.0))
    profile = tmp_path / "chromium-profile"  # a fresh profile every run
    with AppThread(app) as url:
        page_url = f"{url}/dashboard"
        browser = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", page_url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_drive(url, page_url, profile, tmp_path / "dashboard.png"))
        finally:
            browser.terminate()
            browser.wait(30)


async def _drive(url: str, page_url: str, profile: Path, shot: Path) -> None:
    session, page = await _devtools_page(profile, page_url)
    try:
        await page.wait_for("Number(document.body.dataset.updates) >= 1")  # loaded, and one poll rendered
        assert await page.eval(TEXT.format("total")) == "0" and await page.eval(TEXT.format("ttft-p50")) == "-"
        assert await page.eval(TEXT.format("slo-ttft").replace("textContent", "value")) == "5"  # server's targets
        rows = await page.eval("document.querySelectorAll('#instances tr').length")
        assert rows == 2  # prefill0 and decode1
        first = int(await page.eval("document.body.dataset.updates"))

        async with aiohttp.ClientSession() as client:
            async def one(i: int) -> None:
                body = {"prompt": f"Request number {i} says", "max_tokens": 4, "ignore_eos": True}
                async with client.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
            await asyncio.gather(*(one(i) for i in range(3)))

        await page.wait_for(f"{TEXT.format('total')} === '3'")  # the page refreshed by itself
        assert int(await page.eval("document.body.dataset.updates")) > first
        for cell in ("ttft-p50", "ttft-p90", "tpot-p50", "rate", "tokps"):
            assert float(await page.eval(TEXT.format(cell))) > 0, cell
        assert await page.eval(TEXT.format("att-both")) == "100.0%"  # generous SLOs: every request met both
        await asyncio.sleep(1.2)  # another poll: the charts have points to draw
        png = await page.send("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(png["data"]))
        assert shot.stat().st_size > 10_000
    finally:
        await page.ws.close()
        await session.close()


def test_live_window_numbers_match_hand_computed_ones():
    """What the page shows, without a browser: percentiles over successes, attainment over all (a failure misses
    both SLOs, as in bench/metrics.py), rates over the window, old requests dropped."""
    from engine.request import Metrics
    from serving.dashboard import LiveWindow

    def done(ttft: float, tpot_gap: float, n: int) -> Metrics:
        return Metrics(arrival=0.0, token_times=[ttft + i * tpot_gap for i in range(n)])

    w = LiveWindow(seconds=10.0)
    w.started -= 10.0  # a server up for the whole window
    for m in (done(0.1, 0.02, 5), done(0.3, 0.05, 5), done(0.5, 0.01, 1)):
        w.arrived()
        w.observe(m, "length", len(m.token_times))
    w.arrived()
    w.observe(None, "abort", 0)
    s = w.snapshot(ttft_slo=0.4, tpot_slo=0.03)
    assert (s["finished"], s["failed"], s["total_finished"]) == (4, 1, 4)
    assert s["ttft_ms"]["p50"] == pytest.approx(300.0) and s["tpot_ms"]["p99"] == pytest.approx(49.4, abs=0.01)
    # TTFT ok: r0, r1; TPOT ok: r0, r2 (one token: no decode phase); both: r0 -- each over all 4
    assert s["attainment"] == {"ttft": 0.5, "tpot": 0.5, "both": 0.25}
    assert s["request_rate"] == pytest.approx(0.4) and s["output_tokens_per_s"] == pytest.approx(1.1)
    later = w.snapshot(0.4, 0.03, now=time.monotonic() + 11.0)  # the window has moved past them all
    assert later["finished"] == 0 and later["attainment"] is None and later["ttft_ms"]["p50"] is None

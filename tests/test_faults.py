"""Faults: a step that raises, a step that hangs, a KV hand-off that fails or stalls, a reader that stops
reading, and more requests than the queue bound. The affected requests end with a clear error, their KV
blocks are freed on both sides, the other requests go on, and the engine says which instances are left.

First the Cluster alone (no model, as tests/test_policies.py), then the real AsyncEngine on the tiny random
model with faults injected by tests/faults.py's FaultyWorker (real threads, real deadlines of a fraction
of a second), then through the HTTP app.
"""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.config import CacheConfig, EngineConfig, FaultConfig, SamplingParams, SchedulerConfig
from engine.loader import Checkpoint
from scheduler.runtime.cluster import Execute
from server import ServerConfig, create_app
from serving import sse
from serving.api import EngineUnavailableError, QueueFullError
from serving.engine import AsyncEngine
from tests.faults import FaultyWorker
from tests.helpers import TinyTokenizer, hf_model, tiny_config
from tests.test_policies import _cluster, _run, req


# ================= the Cluster: what happens to requests when an instance is taken out =================
def _blocks_free(cluster) -> bool:
    cluster.check()
    return all(s.allocator.num_used == 0 for s in cluster.slots) and not cluster.pending


def _prefill(cluster, slot) -> None:
    """Run slot's prefill step; every request prefilled gets its first token (0)."""
    step = cluster.next_action(slot).step
    cluster.executed(slot, step, [])
    for r in step.requests:
        r.output_ids.append(0)


def test_retired_prefill_instance_hands_its_queue_on_and_fails_what_holds_kv_there():
    cluster, ended = _cluster(["prefill", "prefill", "decode"], blocks=8)
    p0, p1, dec = cluster.slots
    cluster.add(req("a", 40), p0)
    _prefill(cluster, p0)  # a is prefilled on p0 ...
    cluster.add(req("b", 20), p0)  # ... b waits behind it, never started
    for rid in ("c", "d"):
        cluster.add(req(rid, 20), p1)
    cluster.retire(p0)
    assert p0.state == "failed" and cluster.entry == [p1] and cluster.unavailable() is None
    assert dict(ended) == {"a": "error"}  # its KV was on p0 (queued for a pull on dec)
    _run(cluster)
    assert dict(ended) == {"a": "error", "b": "length", "c": "length", "d": "length"}  # b moved to p1
    assert _blocks_free(cluster)


def test_a_failed_kv_pull_frees_both_sides_and_the_rest_go_on():
    cluster, ended = _cluster(["prefill", "decode"], blocks=16)
    pre, dec = cluster.slots
    for i in range(3):
        cluster.add(req(f"r{i}", 20))
    _prefill(cluster, pre)
    pulls = cluster.next_action(dec)
    assert len(pulls) == 3 and pre.allocator.num_used and dec.allocator.num_used
    cluster.pulled(pulls[0], 1)  # the first lands, the second raises: it and the third end
    failed = cluster.failed(dec, "error")
    assert sorted(r.id for r in failed) == ["r1", "r2"] and dec.faults == 1 and dec.state == "ok"
    _run(cluster)
    assert dict(ended) == {"r0": "length", "r1": "error", "r2": "error"}
    assert _blocks_free(cluster)


def test_retiring_the_source_of_a_pull_in_flight_ends_it_when_the_pull_lands():
    cluster, ended = _cluster(["prefill", "prefill", "decode"], blocks=8)
    p0, p1, dec = cluster.slots
    cluster.add(req("a", 20), p0)
    _prefill(cluster, p0)
    (pull,) = cluster.next_action(dec)
    cluster.retire(p0)
    assert not ended  # inside dec's pull: never finished under the driver's feet
    cluster.pulled(pull, 1)
    assert ended == [("a", "error")] and _blocks_free(cluster)


def test_last_decode_instance_gone_ends_everything_and_says_so():
    cluster, ended = _cluster(["prefill", "decode"], blocks=8)
    pre, dec = cluster.slots
    for i in range(3):
        cluster.add(req(f"r{i}", 20))
    action = cluster.next_action(pre)
    assert isinstance(action, Execute)
    cluster.failed(dec, "error")
    cluster.retire(dec, "hung")
    assert cluster.unavailable() == "no decode instance left in dispatch"
    assert len(ended) == 0 or all(reason == "error" for _, reason in ended)
    cluster.executed(pre, action.step, [])  # the prefill step in flight reports back: its requests end too
    assert sorted(ended) == [(f"r{i}", "error") for i in range(3)] and _blocks_free(cluster)


def test_the_admission_queue_is_every_request_not_decoding_yet():
    cluster, _ = _cluster(["prefill", "decode"], blocks=5)
    pre, dec = cluster.slots
    for i, n in enumerate((40, 30, 60)):
        cluster.add(req(f"r{i}", n))
    assert cluster.queued() == (3, 130)
    _prefill(cluster, pre)  # 40 + 30 fit the 5 blocks (3 + 2); 60 waits
    assert cluster.queued() == (3, 130)  # two wait for a decode slot now
    for pull in cluster.next_action(dec):
        cluster.pulled(pull, 1)
    assert cluster.queued() == (1, 60)  # decoding: no longer queued


# ================= the engine: faults injected into real instances =================
@pytest.fixture(scope="module")
def tiny() -> Checkpoint:
    cfg = tiny_config()
    return Checkpoint(cfg, hf_model(cfg).state_dict(), TinyTokenizer(), "tiny")


def config(prefill: int = 1, decode: int = 1, **kw) -> EngineConfig:
    faults = FaultConfig(step_timeout=kw.pop("step_timeout", 5.0), transfer_timeout=kw.pop("transfer_timeout", 5.0),
                         max_faults=kw.pop("max_faults", 3))
    return EngineConfig(dtype="float32", mode="disagg", prefill_devices=["cpu"] * prefill,
                        decode_devices=["cpu"] * decode, cache=CacheConfig(num_blocks=64, block_size=16),
                        faults=faults, **kw)


def run(tiny, cfg: EngineConfig, body):
    async def main():
        engine = AsyncEngine(cfg, tiny, wrap=FaultyWorker)
        await engine.start()
        try:
            return await body(engine)
        finally:
            t = time.monotonic()
            await engine.shutdown()
            assert time.monotonic() - t < 2, "shutdown waited on a hung instance"
    return asyncio.run(main())


def params(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)


async def final(engine: AsyncEngine, i: int, n: int = 6):
    last = None
    async for out in engine.add_request([3 + i, 4, 5, 6, 7], params(n), f"r{i}"):
        last = out
    return last


async def idle(engine: AsyncEngine) -> None:
    """Every block back, no request left anywhere."""
    for _ in range(100):
        if not engine.cluster.requests and all(s.kv_blocks_used == 0 for s in engine.stats()):
            break
        await asyncio.sleep(0.01)
    engine.check()
    assert [s.kv_blocks_used for s in engine.stats()] == [0] * len(engine.slots)
    assert not engine.cluster.requests and not engine.outputs.tracks


def states(engine: AsyncEngine) -> dict[str, tuple[str, int]]:
    return {s.instance: (s.state, s.faults) for s in engine.stats()}


def test_a_step_that_raises_fails_its_requests_and_the_instance_goes_on(tiny):
    async def body(engine):
        engine.instances[0].arm("step", "raise")
        bad = await final(engine, 0)
        good = await asyncio.gather(*(final(engine, i) for i in range(1, 4)))
        await idle(engine)
        return bad, good, states(engine)

    bad, good, st = run(tiny, config(), body)
    assert bad.finish_reason == "error" and "prefill0 failed: step raised InjectedFault" in bad.error
    assert [o.finish_reason for o in good] == ["length"] * 3 and all(len(o.token_ids) == 6 for o in good)
    assert st == {"prefill0": ("ok", 1), "decode1": ("ok", 0)}


def test_repeated_step_faults_take_the_instance_out_of_dispatch(tiny):
    async def body(engine):
        engine.instances[0].arm("step", "raise", 2)
        first = [await final(engine, i) for i in range(2)]  # one at a time: both go to prefill0 (ties: the first)
        rest = await asyncio.gather(*(final(engine, i) for i in range(2, 6)))
        await idle(engine)
        return first + rest, states(engine), engine.cluster.entry

    outs, st, entry = run(tiny, config(prefill=2, max_faults=2), body)
    assert [o.finish_reason for o in outs] == ["error"] * 2 + ["length"] * 4  # the others all on prefill1
    assert st["prefill0"] == ("failed", 2) and [s.name for s in entry] == ["prefill1"]


def test_a_hung_step_is_cut_off_at_its_deadline_and_the_others_go_on(tiny):
    async def body(engine):
        engine.instances[0].arm("step", "hang")
        t = time.monotonic()
        hung = asyncio.create_task(final(engine, 0))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(final(engine, 1))  # lands in prefill0's queue behind the hung step
        bad = await hung
        took = time.monotonic() - t
        others = await asyncio.gather(queued, *(final(engine, i) for i in range(2, 5)))
        await idle(engine)
        return bad, took, others, states(engine)

    bad, took, others, st = run(tiny, config(prefill=2, step_timeout=0.3), body)
    assert bad.finish_reason == "error" and "did not finish within 0.3 s" in bad.error and took < 2
    assert [o.finish_reason for o in others] == ["length"] * 4
    assert st["prefill0"] == ("hung", 1) and st["prefill1"][0] == "ok"


@pytest.mark.parametrize("kind", ["raise", "hang"])
def test_a_failed_or_stalled_kv_pull_frees_both_sides(tiny, kind):
    async def body(engine):
        engine.instances[1].arm("call", kind)  # decode1's next pull
        bad = await final(engine, 0)
        await idle(engine)
        after = await asyncio.gather(*(final(engine, i) for i in range(1, 3)))
        await idle(engine)
        return bad, after, states(engine)

    bad, after, st = run(tiny, config(decode=2, transfer_timeout=0.3), body)
    assert bad.finish_reason == "error" and "KV pull" in bad.error
    assert [o.finish_reason for o in after] == ["length"] * 2
    assert st["decode1"] == (("hung", 1) if kind == "hang" else ("ok", 1)) and st["decode2"][0] == "ok"


def test_no_decode_instance_left_fails_everything_and_refuses_new_requests_at_once(tiny):
    async def body(engine):
        engine.instances[1].arm("call", "hang")
        outs = await asyncio.gather(*(final(engine, i, 40) for i in range(4)))
        await idle(engine)
        t = time.perf_counter()
        with pytest.raises(EngineUnavailableError, match="no decode instance left"):
            engine.add_request([1, 2, 3], params())
        return outs, time.perf_counter() - t

    outs, took = run(tiny, config(transfer_timeout=0.3), body)
    assert [o.finish_reason for o in outs] == ["error"] * 4 and took < 0.01


def test_a_reader_that_falls_behind_gets_merged_updates_and_one_that_stops_is_cut_off(tiny):
    async def body(engine):
        slow = engine.add_request([5, 6, 7], params(40), "slow")
        stuck = engine.add_request([5, 6, 8], params(200), "stuck")  # never read: aborted after the lag
        got = []
        async for out in slow:
            got.append(out)
            await asyncio.sleep(0.05)  # slower than the engine: updates pile up and merge (40 < the lag bound)
        last = None
        async for out in stuck:
            last = out
        await idle(engine)
        return got, last

    got, stuck = run(tiny, config(max_stream_lag=64), body)
    final_out = got[-1]
    assert final_out.finish_reason == "length" and len(final_out.token_ids) == 40
    assert [t for u in got for t in u.new_token_ids] == final_out.token_ids and len(got) < 40  # merged, none lost
    assert stuck.finish_reason == "abort" and "fell more than 64 tokens behind" in stuck.error
    assert len(stuck.token_ids) == 65


def test_the_admission_bound_in_tokens_refuses_at_once(tiny):
    async def body(engine):
        engine.instances[0].arm("step", "hang")  # nothing leaves the queue while we fill it
        first = engine.add_request(list(range(3, 43)), params(), "first")  # 40 tokens: in the hung step
        await asyncio.sleep(0.05)
        queued = [engine.add_request(list(range(3, 33)), params(), f"q{i}") for i in range(3)]  # 90 tokens
        t = time.perf_counter()
        with pytest.raises(QueueFullError, match="130 prompt tokens waiting"):
            engine.add_request(list(range(3, 20)), params(), "over")
        took = time.perf_counter() - t
        for s in [first, *queued]:
            await s.aclose()
        return took

    assert run(tiny, config(scheduler=SchedulerConfig(max_waiting_tokens=140), step_timeout=0.5), body) < 0.01


# ================= over HTTP: clear errors, /health, fail fast =================
def _http(tiny, cfg: EngineConfig, test) -> None:
    async def main():
        engine = AsyncEngine(cfg, tiny, wrap=FaultyWorker)
        app = create_app(engine, ServerConfig())
        async with TestClient(TestServer(app)) as client:
            await test(engine, client)
    asyncio.run(main())


def test_faults_over_http_error_event_then_done_500_health_and_fail_fast(tiny):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True, "temperature": 0}

    async def test(engine, client):
        engine.instances[0].arm("step", "raise", 2)
        r = await client.post("/v1/completions", json={**body, "stream": True})
        events = sse.parse(await r.read())  # headers were sent: the error arrives in-band, then [DONE]
        err = orjson.loads(events[-2])["error"]
        assert r.status == 200 and events[-1] == b"[DONE]" and err["code"] == "engine_error"
        assert "prefill0 failed" in err["message"]
        r = await client.post("/v1/completions", json=body)
        assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
        r = await client.post("/v1/completions", json=body)
        assert r.status == 200 and (await r.json())["choices"][0]["finish_reason"] == "length"
        health = await (await client.get("/health")).json()
        assert health["status"] == "ready" and health["instances"][0] == {
            "name": "prefill0", "role": "prefill", "device": "cpu", "state": "ok", "faults": 2}
        engine.instances[1].arm("call", "hang")  # the only decode instance stalls: nothing can be served
        r = await client.post("/v1/completions", json=body)
        assert r.status == 500
        r = await client.get("/health")
        health = await r.json()
        assert r.status == 503 and health["status"] == "unavailable"
        assert health["instances"][1]["state"] == "hung" and "no decode instance" in health["error"]
        t = time.perf_counter()
        r = await client.post("/v1/completions", json=body)
        assert r.status == 503 and (await r.json())["error"]["code"] == "engine_unavailable"
        assert time.perf_counter() - t < 0.5
        metrics = (await (await client.get("/metrics")).text()).splitlines()
        count = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in metrics if ln and ln[0] != "#"}
        finished = sum(v for k, v in count.items() if k.startswith("distserve_request_finish_total"))
        assert count["distserve_request_started_total"] == finished == 4
        assert count['distserve_request_finish_total{reason="error"}'] == 3

    _http(tiny, config(transfer_timeout=0.3), test)


def test_overload_over_http_is_503_with_retry_after_at_once(tiny):
    body = {"prompt": list(range(3, 43)), "max_tokens": 4, "ignore_eos": True, "temperature": 0}

    async def test(engine, client):
        engine.instances[0].arm("step", "hang")  # the first prompt holds the prefill instance: the queue fills
        held = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
        while engine.cluster.queued()[0] < 2:
            await asyncio.sleep(0.01)
        t = time.perf_counter()
        r = await client.post("/v1/completions", json=body)
        took = time.perf_counter() - t
        assert r.status == 503 and r.headers["Retry-After"] == "1" and took < 0.5
        assert (await r.json())["error"]["code"] == "queue_full"
        for h in held:
            h.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    _http(tiny, config(scheduler=SchedulerConfig(max_waiting=2)), test)

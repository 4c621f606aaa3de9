"""An instance's thread really runs on its cores with that many torch threads; transfers are bit-exact."""
from __future__ import annotations

import os

import pytest
import torch

from engine.config import CacheConfig, parse_device
from engine.instance import Instance, cpu_cores
from engine.kv_cache import KVPool
from engine.model import LlamaModel
from tests.helpers import hf_model, tiny_config
from transfer.base import make_transfer, runs
from transfer.torch_copy import TorchTransfer

CORES = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return LlamaModel(cfg, hf_model(cfg).state_dict())


def thread_settings(inst: Instance) -> tuple[set[int], int]:
    return inst.executor.submit(lambda: (os.sched_getaffinity(0), torch.get_num_threads())).result()


def test_instance_thread_is_pinned_and_sized_to_its_cores(model):
    one = Instance("p", "prefill", f"cpu:{CORES[-1]}", model, CacheConfig(num_blocks=8))
    everything = Instance("c", "colocated", "cpu", model, CacheConfig(num_blocks=8))
    try:
        assert thread_settings(one) == ({CORES[-1]}, 1)
        assert thread_settings(everything) == (set(CORES), len(CORES))
        assert os.sched_getaffinity(0) == set(CORES)  # pinning a worker never narrows the caller
    finally:
        one.close()
        everything.close()


def test_device_strings_parse_and_reject():
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cpu:0-2,5") == ("cpu", [0, 1, 2, 5])
    assert parse_device("cuda:1") == ("cuda", 1)
    for bad in ("gpu:0", "cpu:a", "cuda:x", "cpu:"):
        if bad == "cpu:":
            assert parse_device(bad) == ("cpu", None)
            continue
        with pytest.raises(ValueError):
            parse_device(bad)
    with pytest.raises(ValueError, match="not available"):
        cpu_cores(f"cpu:{max(CORES) + 64}")


def test_runs_group_consecutive_blocks():
    assert runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 4, 8]) == [(4, 0, 3), (9, 3, 2), (2, 8, 1)]
    with pytest.raises(ValueError):
        runs([1, 2], [3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_transfer_is_bit_exact_between_pools_of_different_sizes(dtype):
    cfg = tiny_config()
    src = KVPool(cfg, CacheConfig(num_blocks=40, block_size=4), dtype, name="prefill")
    dst = KVPool(cfg, CacheConfig(num_blocks=25, block_size=4), dtype, name="decode")
    src.cache.copy_(torch.randn(src.cache.shape).to(dtype))
    before = dst.cache.clone()
    src_blocks, dst_blocks = [3, 4, 5, 17, 30, 31], [0, 1, 9, 10, 11, 24]
    stats = TorchTransfer().pull(src, src_blocks, dst, dst_blocks)
    for s, d in zip(src_blocks, dst_blocks):
        assert torch.equal(dst.cache[d], src.cache[s])
    untouched = [b for b in range(25) if b not in dst_blocks]
    assert torch.equal(dst.cache[untouched], before[untouched])
    assert stats.bytes == 6 * src.block_bytes and stats.copies == 5  # (3,4) (5) (17) (30) (31)


@pytest.mark.parametrize("src_blocks", [[3, 4, 5], [9, 2, 30, 7, 11, 21]])  # slab copies; the gather (> 4 runs)
def test_torch_transfer_widens_a_bf16_pool_into_a_float32_pool_exactly(src_blocks):
    """Phases in different precisions (bf16 prefill, native decode on float32): every bf16 value is a float32
    one, so the decode pool holds exactly what the prefill pool held."""
    cfg = tiny_config()
    src = KVPool(cfg, CacheConfig(num_blocks=32, block_size=4), torch.bfloat16, name="prefill")
    dst = KVPool(cfg, CacheConfig(num_blocks=32, block_size=4), torch.float32, name="decode")
    src.cache.copy_(torch.randn(src.cache.shape).bfloat16())
    dst_blocks = list(range(len(src_blocks)))
    stats = TorchTransfer().pull(src, src_blocks, dst, dst_blocks)
    assert torch.equal(dst.cache[dst_blocks], src.cache[src_blocks].float())
    assert stats.bytes == len(src_blocks) * src.block_bytes


def test_transfer_refuses_incompatible_pools():
    a = KVPool(tiny_config(), CacheConfig(num_blocks=4), torch.float32)
    b = KVPool(tiny_config(num_layers=3), CacheConfig(num_blocks=4), torch.float32)
    with pytest.raises(ValueError, match="incompatible"):
        TorchTransfer().pull(a, [0], b, [0])


def test_auto_transfer_is_torch_on_cpu():
    assert make_transfer("auto", "cpu:0", "cpu:1").name == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cupy_peer_transfer_is_bit_exact():
    pytest.importorskip("cupy")
    from transfer.cupy_p2p import CupyTransfer

    cfg = tiny_config()
    src = KVPool(cfg, CacheConfig(num_blocks=16), torch.bfloat16, "cuda:0")
    dst = KVPool(cfg, CacheConfig(num_blocks=16), torch.bfloat16, "cuda:1")
    src.cache.copy_(torch.randn(src.cache.shape, device="cuda:0").bfloat16())
    stats = CupyTransfer().pull(src, [1, 2, 3, 7], dst, [5, 6, 7, 0])
    assert torch.equal(dst.cache[[5, 6, 7, 0]].cpu(), src.cache[[1, 2, 3, 7]].cpu())
    assert stats.copies == 2


def test_shared_pool_is_mapped_by_another_process_and_leaves_no_file(tmp_path):
    """transfer/shared.py: a second process maps the pool (no copy), reads what was written and writes back;
    the file has no name from the start, so nothing can be left behind."""
    import subprocess
    import sys

    from transfer.shared import SharedPool, open_pool

    shared = SharedPool("t", torch.device("cpu"), directory=str(tmp_path))
    pool = KVPool(tiny_config(), CacheConfig(num_blocks=6, block_size=4), torch.bfloat16, allocate=shared.allocate)
    pool.cache[2].fill_(1.5)
    assert list(tmp_path.iterdir()) == []
    same = open_pool(shared.handle(), 4, "again")  # this process can map it too: the same memory
    assert same.cache.data_ptr() != pool.cache.data_ptr() and torch.equal(same.cache, pool.cache)
    code = ("import pickle, sys, torch; from transfer.shared import open_pool; "
            "p = open_pool(pickle.loads(sys.stdin.buffer.read()), 4, 'peer'); "
            "assert float(p.cache[2].float().mean()) == 1.5; p.cache[5].fill_(-2)")
    import pickle

    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(shared.handle()), check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert torch.all(pool.cache[5] == -2) and torch.all(pool.cache[4] == 0)
    stats = TorchTransfer().pull(same, [5, 2], KVPool(tiny_config(), CacheConfig(num_blocks=3, block_size=4),
                                                      torch.bfloat16), [0, 1])
    assert stats.bytes == 2 * pool.block_bytes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_instance_runs_on_its_own_stream_and_matches_the_cpu_instance(model):
    """A step on the instance's CUDA stream is complete when run() returns: the same tokens and KV as on a CPU."""
    from engine.config import SamplingParams
    from engine.request import Request
    from engine.step import Step

    cfg = model.cfg
    gpu_model = LlamaModel(cfg, {k: v.cpu() for k, v in hf_model(cfg).state_dict().items()}, torch.float32,
                           torch.device("cuda:0"))
    out = {}
    for dev, m in (("cpu", model), ("cuda:0", gpu_model)):
        inst = Instance("i", "colocated", dev, m, CacheConfig(num_blocks=8, block_size=4))
        try:
            assert (inst.stream is not None) == dev.startswith("cuda")
            req = Request("r", list(range(3, 14)), SamplingParams(temperature=0))
            req.block_table = inst.pool.allocator.allocate("r", 3)
            sampled = inst.executor.submit(inst.run, Step([(req, 11)])).result()
            out[dev] = (sampled[0].token, inst.pool.cache[req.block_table].cpu())
        finally:
            inst.close()
    assert out["cpu"][0] == out["cuda:0"][0]
    torch.testing.assert_close(out["cuda:0"][1], out["cpu"][1], atol=1e-4, rtol=1e-4)

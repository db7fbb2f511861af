"""Microbenchmarks of the built-in C functions (cext/vf_builtin.h) on 64 KiB chunks.

Each function runs through srv6pipes._vf.FunctionDriver, which drives the relay's own flow
core (cext/flowcore.h: input buffer, output room, INPLACE in place), so the numbers include
the driver's per-chunk work: a Python call, the copy of each arrival into the core's input
buffer (what recv does in the relay) and of the output into a bytes object. `count` does
almost nothing per byte, so its number is roughly that overhead's ceiling.

    pytest bench/bench_vf_kernels.py --benchmark-only
"""
import os
import random
import sys

import pytest

from srv6pipes import _vf

# The same text the unit tests compress (tests/support/vfharness.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.vfharness import text_like  # noqa: E402
from srv6pipes.vfapi import UP

CHUNK = 64 * 1024
ADDRESS = {d["name"]: d["address"] for d in _vf.BUILTIN_FUNCTIONS}


def throughput(benchmark, nbytes):
    """Adds MB/s (from the mean time) to the report's extra info."""
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None and stats.mean:
        benchmark.extra_info["MB/s"] = round(nbytes / stats.mean / 1e6, 1)


@pytest.fixture
def flow():
    """Factory: flow(name, params) -> a FunctionDriver, closed after the benchmark."""
    made = []

    def make(name, params=0):
        made.append(_vf.FunctionDriver(ADDRESS[name], params))
        return made[-1]

    yield make
    for driver in made:
        driver.close()


def test_xor_64k(benchmark, flow):
    driver, chunk = flow("xor", 0x5A), os.urandom(CHUNK)
    benchmark(driver.feed, UP, chunk)
    throughput(benchmark, CHUNK)


@pytest.mark.parametrize("passes", [1, 2, 4, 8])
def test_xor_passes_64k(benchmark, flow, passes):
    """n = passes: 2n xor passes over every chunk (the paper's Fig. 9 cost model)."""
    driver, chunk = flow("xor-passes", passes), os.urandom(CHUNK)
    benchmark(driver.feed, UP, chunk)
    throughput(benchmark, CHUNK)


@pytest.mark.parametrize("level", [1, 6])
def test_compress_64k_text(benchmark, flow, level):
    """One long stream: every 64 KiB arrival is compressed and sync-flushed."""
    driver, chunk = flow("compress", level), text_like(CHUNK)
    benchmark(driver.feed, UP, chunk)
    throughput(benchmark, CHUNK)
    benchmark.extra_info["ratio"] = round(CHUNK / len(driver.feed(UP, chunk)), 2)


def test_decompress_text(benchmark):
    """A fresh flow per round inflates 1 MiB of text (compressed at level 6, arriving in
    64 KiB pieces); MB/s counts the decompressed bytes."""
    data = text_like(16 * CHUNK)
    with _vf.FunctionDriver(ADDRESS["compress"], 6) as compressor:
        wire = compressor.feed(UP, data) + compressor.finish(UP)

    def decompress():
        with _vf.FunctionDriver(ADDRESS["decompress"], 0) as driver:
            return driver.feed(UP, wire) + driver.finish(UP)

    assert benchmark(decompress) == data
    throughput(benchmark, len(data))


def test_dpi_64k_100_patterns(benchmark, flow):
    rng = random.Random(3)
    _vf.set_dpi_patterns([bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=8)) + b"!"
                          for _ in range(100)])   # "!" never occurs in the text: no match
    try:
        driver, chunk = flow("dpi"), text_like(CHUNK)
        benchmark(driver.feed, UP, chunk)
        throughput(benchmark, CHUNK)
    finally:
        _vf.set_dpi_patterns([])


def test_count_64k(benchmark, flow):
    driver, chunk = flow("count", 64), os.urandom(CHUNK)
    benchmark(driver.feed, UP, chunk)
    throughput(benchmark, CHUNK)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_encrypt_64k_python(benchmark, tmp_path, direction):
    """encrypt/decrypt are Python functions (cryptography's ChaCha20): measured through
    vfapi.FlowAdapter.step, the call the relay's trampoline makes per chunk."""
    from srv6pipes import vf_crypto
    from srv6pipes.vfapi import FlowAdapter, FlowInfo

    keyring = tmp_path / "keyring"
    keyring.write_text("1 " + "cd" * 32 + "\n")
    keyring.chmod(0o600)
    vf_crypto.configure(str(keyring))
    function = next(f for f in vf_crypto.FUNCTIONS if f.name == direction)
    flow = FlowInfo("fd00:c::1", 40000, "fd00:d::1", 80, "fc00:1::5:0:1", 1)
    adapter = FlowAdapter(function, 1, flow)
    chunk = os.urandom(CHUNK)
    if direction == "decrypt":  # the decrypting side first takes the peer's 16-byte salt
        adapter.step(UP, os.urandom(vf_crypto.SALT_SIZE), False, CHUNK)
    try:
        benchmark(adapter.step, UP, chunk, False, CHUNK)
        throughput(benchmark, CHUNK)
    finally:
        adapter.close()
        vf_crypto.configure(None)

"""Microbenchmarks of the relay's per-chunk transform kernels (cext/relay_impl.h).

The buffer path of the relay loop calls the kernel once per chunk read, in place, on buffers
of up to `buffer_size` (64 KiB by default): that is the size measured here.

    pytest bench/bench_relay_kernels.py --benchmark-only

(the file is named bench_*.py, so pass it explicitly: pytest only collects test_*.py by default).
"""
import os

import pytest

from srv6pipes import _relay

SIZE = 64 * 1024
KEY = 0x5A


def throughput(benchmark, nbytes):
    """Adds MB/s (from the mean time) to the report's extra info."""
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None and stats.mean:
        benchmark.extra_info["MB/s"] = round(nbytes / stats.mean / 1e6, 1)


@pytest.fixture
def buf():
    return bytearray(os.urandom(SIZE))


def test_xor_inplace_64k(benchmark, buf):
    benchmark(_relay.xor_inplace, buf, KEY)
    throughput(benchmark, SIZE)


def test_xor_inplace_64k_unaligned(benchmark, buf):
    """A chunk starting at an odd address (a partial read leaves such offsets)."""
    view = memoryview(bytearray(SIZE + 1))[1:]
    view[:] = buf
    benchmark(_relay.xor_inplace, view, KEY)
    throughput(benchmark, SIZE)
    view.release()


def test_xor_inplace_1500(benchmark):
    """One MTU-sized chunk: the per-call overhead dominates."""
    small = bytearray(os.urandom(1500))
    benchmark(_relay.xor_inplace, small, KEY)
    throughput(benchmark, 1500)


def test_reference_translate_64k(benchmark, buf):
    """Pure-Python baseline (a copying bytes.translate) to put the kernel in perspective."""
    table = bytes(i ^ KEY for i in range(256))
    data = bytes(buf)
    benchmark(data.translate, table)
    throughput(benchmark, SIZE)

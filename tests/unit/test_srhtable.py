"""Unit tests for srv6pipes._srhtable: the shared-memory SRH table (no network).

Covers the declared layout, insert/lookup within and across processes, replacement,
expiry, eviction, rejection, the reader/writer split, a seqlock stress test with a
self-checking writer, and hypothesis models of random operation sequences.
"""
import ipaddress
import mmap
import multiprocessing
import os
import struct
import time
import uuid

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srv6pipes import _srhtable
from srv6pipes._srhtable import SrhTable, SrhTableError

from tests.support.childrun import run_in_child

CLIENT = ipaddress.IPv6Address("fc00:c::1").packed
SERVER = ipaddress.IPv6Address("fc00:5::80").packed
SRH_A = bytes(range(40))
SRH_B = b"\xab" * 56

HEADER = struct.Struct("=QIIIIIIIIQQI")  # magic .. writer_pid, offsets 0..59
ENTRY = struct.Struct("=IHBxQ16s16sHH")  # seq, srh_len, orig_sl, at, client, dest, ports


def fork_context():
    return multiprocessing.get_context("fork")


def unique_name():
    return f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def name():
    value = unique_name()
    yield value
    _srhtable.unlink(value)


@pytest.fixture
def table(name):
    writer = SrhTable.create(name, nslots=1024, ttl_ms=30000)
    yield writer
    writer.close()


def key(i):
    """A distinct key per integer: client address, client port, destination, port."""
    client = ipaddress.IPv6Address(f"fc00:c::{i // 40000:x}:{i % 40000 + 1:x}").packed
    return client, 1024 + i % 60000, SERVER, 80 + i % 7


# -- basics ---------------------------------------------------------------------------
def test_insert_then_lookup(table):
    assert table.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A) is True
    assert table.lookup(CLIENT, 40000, SERVER, 80) == (2, SRH_A)
    assert table.lookup(CLIENT, 40001, SERVER, 80) is None
    assert table.lookup(CLIENT, 40000, SERVER, 81) is None
    assert table.lookup(SERVER, 40000, CLIENT, 80) is None


def test_addresses_as_text_ipaddress_or_buffers(table):
    table.insert("fc00:c::1", 40000, ipaddress.IPv6Address("fc00:5::80"), 80, 1, bytearray(SRH_A))
    assert table.lookup(CLIENT, 40000, SERVER, 80) == (1, SRH_A)
    assert table.lookup("fc00:c::1", 40000, "fc00:5::80", 80) == (1, SRH_A)
    assert table.lookup(memoryview(CLIENT), 40000, bytearray(SERVER), 80) == (1, SRH_A)


def test_empty_and_maximal_srh(table):
    assert table.insert(CLIENT, 1, SERVER, 2, 0, b"")
    assert table.lookup(CLIENT, 1, SERVER, 2) == (0, b"")
    big = bytes(i % 251 for i in range(_srhtable.SRH_MAX))
    assert table.insert(CLIENT, 3, SERVER, 4, 255, big)
    assert table.lookup(CLIENT, 3, SERVER, 4) == (255, big)


def test_oversized_srh_is_rejected_and_counted(table):
    assert table.insert(CLIENT, 40000, SERVER, 80, 1, b"x" * (_srhtable.SRH_MAX + 1)) is False
    assert table.lookup(CLIENT, 40000, SERVER, 80) is None
    counters = table.counters()
    assert counters["rejected"] == 1 and counters["inserts"] == 0 and counters["used"] == 0


@pytest.mark.parametrize("args, message", [
    ((b"\x00" * 15, 1, SERVER, 2, 0, b""), "16 bytes"),
    (("not-an-address", 1, SERVER, 2, 0, b""), "not an IPv6 address"),
    ((CLIENT, 65536, SERVER, 2, 0, b""), "ports"),
    ((CLIENT, 1, SERVER, -1, 0, b""), "ports"),
    ((CLIENT, 1, SERVER, 2, 256, b""), "segments-left"),
])
def test_invalid_arguments(table, args, message):
    with pytest.raises(ValueError, match=message):
        table.insert(*args)


def test_replacing_same_key(table):
    table.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A)
    table.insert(CLIENT, 40000, SERVER, 80, 1, SRH_B)
    assert table.lookup(CLIENT, 40000, SERVER, 80) == (1, SRH_B)
    counters = table.counters()
    assert (counters["inserts"], counters["replaced"], counters["used"]) == (2, 1, 1)


def test_nslots_rounded_to_power_of_two(name):
    with SrhTable.create(name, nslots=100) as writer:
        assert writer.nslots == 128 and writer.counters()["nslots"] == 128
    with SrhTable.create(name, nslots=1) as writer:
        assert writer.nslots == _srhtable.PROBE


@pytest.mark.parametrize("kwargs", [{"nslots": 0}, {"nslots": _srhtable.MAX_SLOTS + 1},
                                    {"ttl_ms": 0}])
def test_create_validates(name, kwargs):
    with pytest.raises(ValueError):
        SrhTable.create(name, **kwargs)


@pytest.mark.parametrize("bad", ["", "a/b", 7])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        SrhTable.create(bad)


# -- expiry and eviction --------------------------------------------------------------
def test_expired_entries_are_not_returned(name):
    with SrhTable.create(name, nslots=64, ttl_ms=40) as writer:
        writer.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A)
        assert writer.lookup(CLIENT, 40000, SERVER, 80) == (2, SRH_A)
        time.sleep(0.1)
        assert writer.lookup(CLIENT, 40000, SERVER, 80) is None
        assert writer.counters()["used"] == 0
        # Inserting the same key again reuses its slot: neither a replacement nor an eviction.
        writer.insert(CLIENT, 40000, SERVER, 80, 1, SRH_B)
        assert writer.lookup(CLIENT, 40000, SERVER, 80) == (1, SRH_B)
        counters = writer.counters()
        assert (counters["replaced"], counters["evictions"], counters["used"]) == (0, 0, 1)


def test_expired_slots_are_reused_without_eviction(name):
    with SrhTable.create(name, nslots=8, ttl_ms=40) as writer:  # one window: the whole table
        for i in range(8):
            writer.insert(*key(i), 1, SRH_A)
        time.sleep(0.1)
        for i in range(8, 16):
            writer.insert(*key(i), 1, SRH_B)
        counters = writer.counters()
        assert counters["evictions"] == 0 and counters["used"] == 8
        assert all(writer.lookup(*key(i)) == (1, SRH_B) for i in range(8, 16))


def test_full_window_evicts_the_oldest(name):
    with SrhTable.create(name, nslots=8) as writer:
        for i in range(8):
            writer.insert(*key(i), i, SRH_A)
            time.sleep(0.003)  # distinct millisecond timestamps: a well-defined oldest
        writer.insert(*key(8), 8, SRH_B)
        assert writer.lookup(*key(0)) is None
        assert writer.lookup(*key(8)) == (8, SRH_B)
        assert all(writer.lookup(*key(i)) == (i, SRH_A) for i in range(1, 8))
        counters = writer.counters()
        assert (counters["inserts"], counters["evictions"], counters["used"]) == (9, 1, 8)


def test_overfull_table_counts_every_eviction(name):
    with SrhTable.create(name, nslots=64) as writer:
        for i in range(1000):
            assert writer.insert(*key(i), 3, SRH_A)
        counters = writer.counters()
        # Without expiry or replacement, each insert either fills a slot or evicts one.
        assert counters["used"] == 64
        assert counters["inserts"] == counters["used"] + counters["evictions"] == 1000
        found = [i for i in range(1000) if writer.lookup(*key(i)) is not None]
        assert len(found) == 64


def test_half_full_table_rarely_evicts(name):
    with SrhTable.create(name, nslots=16384) as writer:
        for i in range(8192):
            writer.insert(*key(i), 1, SRH_A)
        # Linear probing at load 0.5 with a window of 8: a full window is rare (about 0.5% of
        # inserts evict, 64 at most in 150 trials with random seeds).
        assert writer.counters()["evictions"] < 164
        assert sum(writer.lookup(*key(i)) is not None for i in range(8192)) \
            == 8192 - writer.counters()["evictions"]


# -- readers, writers and segments ----------------------------------------------------
def test_reader_in_another_process_sees_inserts(table, name):
    table.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A)

    def read():
        reader = SrhTable.attach(name)
        return reader.lookup(CLIENT, 40000, SERVER, 80), reader.lookup(CLIENT, 1, SERVER, 80)

    assert run_in_child(read) == ((2, SRH_A), None)


def test_writer_in_another_process(name):
    def write():
        writer = SrhTable.create(name, nslots=64)
        writer.insert(CLIENT, 40000, SERVER, 80, 3, SRH_B)
        writer.count("syn_seen", 5)
        return writer.segment

    assert run_in_child(write) == f"/srv6pipes-{name}-srh"
    reader = SrhTable.attach(name)
    assert reader.lookup(CLIENT, 40000, SERVER, 80) == (3, SRH_B)
    counters = reader.counters()
    assert counters["syn_seen"] == 5 and counters["inserts"] == 1 and counters["used"] == 1
    assert reader.writable is False
    reader.close()


def test_readers_cannot_write(table, name):
    reader = SrhTable.attach(name)
    with pytest.raises(SrhTableError, match="read-only"):
        reader.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A)
    with pytest.raises(SrhTableError, match="read-only"):
        reader.count("no_srh")
    reader.close()


def test_count_capture_counters(table):
    table.count("syn_seen")
    table.count("no_srh", 3)
    counters = table.counters()
    assert counters["syn_seen"] == 1 and counters["no_srh"] == 3
    assert set(_srhtable.COUNTERS) <= set(counters)
    with pytest.raises(KeyError, match="unknown SRH table counter"):
        table.count("bogus")


def test_attach_missing_table_is_a_clear_error(name):
    with pytest.raises(SrhTableError, match="does not exist"):
        SrhTable.attach(name)
    started = time.monotonic()
    with pytest.raises(SrhTableError):
        SrhTable.attach(name, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2


def test_attach_waits_for_the_writer(name):
    ctx = fork_context()
    writer = ctx.Process(target=lambda: (time.sleep(0.2), SrhTable.create(name, nslots=8)))
    writer.start()
    try:
        reader = SrhTable.attach(name, timeout=10)
        assert reader.nslots == 8
        reader.close()
    finally:
        writer.join(10)


def test_attach_rejects_other_segments(name):
    segment = f"/srv6pipes-{name}-srh"
    shm = posix_ipc.SharedMemory(segment, posix_ipc.O_CREX, size=4096)
    with mmap.mmap(shm.fd, 4096) as mapped:
        mapped[:8] = b"NOTATABL"
    shm.close_fd()
    with pytest.raises(SrhTableError, match="bad magic"):
        SrhTable.attach(name)
    _srhtable.unlink(name)
    shm = posix_ipc.SharedMemory(segment, posix_ipc.O_CREX, size=16)
    shm.close_fd()
    with pytest.raises(SrhTableError, match="not an SRH table"):
        SrhTable.attach(name)


def test_attach_rejects_other_versions(table, name):
    shm = posix_ipc.SharedMemory(f"/srv6pipes-{name}-srh")
    with mmap.mmap(shm.fd, 256) as mapped:
        mapped[8:12] = struct.pack("=I", _srhtable.VERSION + 1)
    shm.close_fd()
    with pytest.raises(SrhTableError, match="layout version"):
        SrhTable.attach(name)


def test_layout_matches_the_documentation(table, name):
    """The offsets in the module docstring are what other tools (and versions) rely on."""
    table.insert(CLIENT, 40000, SERVER, 80, 2, SRH_A)
    table.count("malformed", 7)
    nslots = table.nslots
    shm = posix_ipc.SharedMemory(f"/srv6pipes-{name}-srh", read_only=True)
    size = shm.size
    mapped = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
    shm.close_fd()
    try:
        (magic, version, header_size, slots, slot_size, srh_max, probe, ttl_ms, state, _seed,
         total, pid) = HEADER.unpack_from(mapped, 0)
        assert magic.to_bytes(8, "little") == b"SRV6SRHT"
        assert (version, header_size, slots, slot_size, srh_max, probe, ttl_ms, state) == \
            (1, 256, nslots, 64, 1024, 8, 30000, 0)
        assert total == size == 256 + nslots * (64 + 1024) and pid == os.getpid()
        counters = struct.unpack_from("=16Q", mapped, 64)
        assert counters[_srhtable.COUNTER_INDEX["inserts"]] == 1
        assert counters[_srhtable.COUNTER_INDEX["malformed"]] == 7
        slots_used = []
        for index in range(nslots):
            seq, srh_len, orig_sl, at, client, dest, cport, dport = \
                ENTRY.unpack_from(mapped, 256 + 64 * index)
            if at:
                slots_used.append(index)
                assert seq % 2 == 0 and seq > 0
                assert (srh_len, orig_sl, client, dest, cport, dport) == \
                    (len(SRH_A), 2, CLIENT, SERVER, 40000, 80)
                data_at = 256 + 64 * nslots + 1024 * index
                assert mapped[data_at:data_at + srh_len] == SRH_A
                assert abs(at - _srhtable.now_ms()) < 5000
        assert len(slots_used) == 1
    finally:
        mapped.close()


def writable_entries(name):
    """The segment mapped writable, as another writer (or a dead one) sees it."""
    shm = posix_ipc.SharedMemory(f"/srv6pipes-{name}-srh")
    mapped = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    return mapped


def test_a_slot_left_mid_write_is_skipped_and_a_busy_window_gives_up(name):
    """A writer that died mid-write leaves its slot's sequence odd for good: inserts choose
    other slots, and with the whole window odd one gives up (counted) instead of spinning."""
    table = SrhTable.create(name, nslots=_srhtable.PROBE, ttl_ms=30000)
    mapped = writable_entries(name)
    try:
        for index in range(_srhtable.PROBE - 1):   # all but the last slot: odd
            struct.pack_into("=I", mapped, 256 + 64 * index, 1)
        table.insert(CLIENT, 1, SERVER, 80, 1, SRH_A)
        assert table.lookup(CLIENT, 1, SERVER, 80) == (1, SRH_A)
        struct.pack_into("=I", mapped, 256 + 64 * (_srhtable.PROBE - 1), 3)
        table.insert(CLIENT, 2, SERVER, 80, 1, SRH_B)
        assert table.lookup(CLIENT, 2, SERVER, 80) is None
        assert table.counters()["insert_busy"] == 1 and table.counters()["inserts"] == 1
    finally:
        mapped.close()
        table.close()


def test_an_entry_stamped_after_our_clock_read_is_live_not_expired(name):
    """Another capture may stamp a slot with a time later than the inserting one read:
    such an entry is live (evicted and counted if it must go), not free."""
    table = SrhTable.create(name, nslots=_srhtable.PROBE, ttl_ms=30000)
    for port in range(_srhtable.PROBE):
        table.insert(CLIENT, 100 + port, SERVER, 80, 1, SRH_A)
    mapped = writable_entries(name)
    try:
        future = _srhtable.now_ms() + 3_600_000
        for index in range(_srhtable.PROBE):
            struct.pack_into("=Q", mapped, 256 + 64 * index + 8, future)
        table.insert(CLIENT, 1, SERVER, 80, 1, SRH_B)
        counters = table.counters()
        assert counters["evictions"] == 1 and counters["insert_busy"] == 0
        assert table.lookup(CLIENT, 1, SERVER, 80) == (1, SRH_B)
    finally:
        mapped.close()
        table.close()


def test_create_replaces_a_stale_table_and_readers_follow(name):
    first = SrhTable.create(name, nslots=64)
    first.insert(CLIENT, 1, SERVER, 2, 1, SRH_A)
    reader = SrhTable.attach(name)
    assert reader.lookup(CLIENT, 1, SERVER, 2) == (1, SRH_A) and not reader.stale
    second = SrhTable.create(name, nslots=128)  # e.g. the capture process restarted
    assert first.stale and reader.stale
    second.insert(CLIENT, 3, SERVER, 4, 2, SRH_B)
    assert reader.lookup(CLIENT, 3, SERVER, 4) == (2, SRH_B)
    assert reader.reattaches == 1 and not reader.stale and reader.nslots == 128
    assert reader.lookup(CLIENT, 1, SERVER, 2) is None
    for mapping in (first, second, reader):
        mapping.close()


def test_close_and_unlink(name):
    writer = SrhTable.create(name, nslots=8)
    reader = SrhTable.attach(name)
    writer.unlink()
    assert reader.stale  # nothing will replace it, but readers know it is gone
    writer.unlink()  # idempotent
    _srhtable.unlink(name)  # missing: ignored
    with pytest.raises(SrhTableError):
        SrhTable.attach(name)
    writer.close()
    writer.close()
    assert writer.closed and "closed" in repr(writer)
    with pytest.raises(ValueError, match="closed"):
        writer.lookup(CLIENT, 1, SERVER, 2)
    with pytest.raises(ValueError, match="closed"):
        writer.counters()
    assert reader.lookup(CLIENT, 1, SERVER, 2) is None
    reader.close()


# -- concurrency ----------------------------------------------------------------------
KEYS = 24            # more keys than slots: evictions move keys between slots all the time
STRESS_SLOTS = 16
STRESS_SECONDS = 2.0


def stress_value(index, counter):
    """Self-checking value: 8-byte (key index, counter) head, then a length and a byte
    pattern both derived from them; segments-left is counter mod 256."""
    length = 8 + (counter * 37 + index) % (_srhtable.SRH_MAX - 8)
    fill = bytes([(index * 31 + counter) & 0xFF])
    return counter & 0xFF, struct.pack("=II", index, counter) + fill * (length - 8)


def check_stress_value(index, entry):
    orig_sl, srh = entry
    got_index, counter = struct.unpack_from("=II", srh)
    expected = stress_value(index, counter)
    if got_index != index or entry != expected:
        return f"key {index}: inconsistent value (head {got_index}, {counter}; length {len(srh)})"
    return counter


def stress_writer(name, stop, started):
    writer = SrhTable.create(name, STRESS_SLOTS)
    started.set()
    counter = 0
    deadline = time.monotonic() + STRESS_SECONDS + 5
    while not stop.is_set() and time.monotonic() < deadline:
        for index in range(KEYS):
            counter += 1
            writer.insert(*key(index), *stress_value(index, counter))
    return writer.counters()["inserts"]


def stress_reader(name, stop, started):
    assert started.wait(10)
    reader = SrhTable.attach(name)
    last = [0] * KEYS
    reads = hits = 0
    errors = []
    deadline = time.monotonic() + STRESS_SECONDS
    try:
        while time.monotonic() < deadline and len(errors) < 5:
            for index in range(KEYS):
                reads += 1
                entry = reader.lookup(*key(index))
                if entry is None:
                    continue
                hits += 1
                result = check_stress_value(index, entry)
                if isinstance(result, str):
                    errors.append(result)
                elif result < last[index]:
                    errors.append(f"key {index}: counter went back from {last[index]} to {result}")
                else:
                    last[index] = result
    finally:
        stop.set()
    return {"reads": reads, "hits": hits, "errors": errors, "retries": reader.lookup_retries,
            "busy": reader.lookup_busy}


def results_of(processes, results, stop, started=None) -> list:
    """Starts the stress processes (then sets `started`, if given), takes one result from
    each, and always stops, joins (or kills) them all."""
    for process in processes:
        process.start()
    if started is not None:
        started.set()
    try:
        return [results.get(timeout=STRESS_SECONDS + 30) for _ in processes]
    finally:
        stop.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def test_concurrent_reader_never_sees_a_torn_entry(name):
    ctx = fork_context()
    stop, started = ctx.Event(), ctx.Event()
    results = ctx.Queue()

    def child(role):
        func = stress_writer if role == "writer" else stress_reader
        try:
            results.put((role, func(name, stop, started)))
        except BaseException as exc:  # noqa: BLE001
            stop.set()
            results.put((role, repr(exc)))

    processes = [ctx.Process(target=child, args=(role,)) for role in ("writer", "reader")]
    outcome = dict(results_of(processes, results, stop))
    reader, inserts = outcome["reader"], outcome["writer"]
    assert isinstance(reader, dict), reader
    assert isinstance(inserts, int), inserts
    assert reader["errors"] == []
    assert reader["hits"] > 1000 and inserts > 1000, (reader, inserts)


def shared_stress_writer(table, indexes, stop, started):
    """One of several captures writing one table (inherited over fork, as pipesd's captures
    do): its own keys, ever-growing self-checking values, each read back at once (where a
    slot two writers took at the same time would show torn). Returns (inserts, errors,
    entries read back)."""
    started.wait(10)
    counter = hits = 0
    errors = []
    deadline = time.monotonic() + STRESS_SECONDS
    while not stop.is_set() and time.monotonic() < deadline and len(errors) < 5:
        for index in indexes:
            counter += 1
            table.insert(*key(index), *stress_value(index, counter))
            entry = table.lookup(*key(index))  # None: another writer evicted it since
            if entry is None:
                continue
            hits += 1
            if isinstance(check_stress_value(index, entry), str):
                errors.append(check_stress_value(index, entry))
    return counter, errors, hits


def test_concurrent_writers_never_tear_a_slot(name):
    """Two captures insert into one small table at once, one per CPU (each its own keys,
    so every slot is fought over): no entry ever reads back torn, every insert is counted,
    and what the table holds at the end is consistent."""
    ctx = fork_context()
    table = SrhTable.create(name, STRESS_SLOTS)
    stop, started = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    halves = (range(0, KEYS, 2), range(1, KEYS, 2))

    def child(indexes):
        try:
            results.put(shared_stress_writer(table, indexes, stop, started))
        except BaseException as exc:  # noqa: BLE001
            stop.set()
            results.put(repr(exc))

    processes = [ctx.Process(target=child, args=(half,)) for half in halves]
    writers = results_of(processes, results, stop, started)
    assert all(isinstance(result, tuple) for result in writers), writers
    assert [errors for _, errors, _ in writers] == [[], []]
    writes = [count for count, _, _ in writers]
    assert min(writes) > 1000, writes
    assert min(hits for _, _, hits in writers) > 1000, writers  # entries were read back
    assert table.counters()["inserts"] == sum(writes)
    for index in range(KEYS):
        entry = table.lookup(*key(index))
        assert entry is None or isinstance(check_stress_value(index, entry), int)
    table.close()


# -- models ---------------------------------------------------------------------------
ADDRESSES = [ipaddress.IPv6Address(f"fc00::{i}").packed for i in (1, 2, 3)]
keys_strategy = st.tuples(st.sampled_from(ADDRESSES), st.integers(0, 65535),
                          st.sampled_from(ADDRESSES), st.integers(0, 65535))
value_strategy = st.tuples(st.integers(0, 255), st.binary(max_size=_srhtable.SRH_MAX))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=st.lists(keys_strategy, min_size=1, max_size=_srhtable.PROBE, unique=True),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7), value_strategy), max_size=60))
def test_within_capacity_the_table_is_a_dict(pool, ops):
    """At most PROBE keys never fill a probe window: the table behaves exactly as a dict."""
    table_name = unique_name()
    model = {}
    inserts = replaced = 0
    try:
        with SrhTable.create(table_name, nslots=64) as writer:
            for is_insert, which, value in ops:
                k = pool[which % len(pool)]
                if is_insert:
                    replaced += k in model
                    inserts += 1
                    assert writer.insert(k[0], k[1], k[2], k[3], *value)
                    model[k] = value
                assert writer.lookup(*k) == model.get(k)
            for k in pool:
                assert writer.lookup(*k) == model.get(k)
            counters = writer.counters()
            assert counters["inserts"] == inserts and counters["replaced"] == replaced
            assert counters["evictions"] == 0 and counters["used"] == len(model)
    finally:
        _srhtable.unlink(table_name)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=300))
def test_over_capacity_a_hit_is_always_the_latest_value(ops):
    """With evictions, a lookup may miss but never returns a stale or foreign value."""
    table_name = unique_name()
    latest = {}
    try:
        with SrhTable.create(table_name, nslots=16) as writer:
            for counter, (index, sl) in enumerate(ops):
                value = (sl, struct.pack("=II", index, counter))
                writer.insert(*key(index), *value)
                latest[index] = value
            hits = 0
            for index in range(200):
                entry = writer.lookup(*key(index))
                if entry is not None:
                    hits += 1
                    assert entry == latest[index]
            assert hits == writer.counters()["used"] <= 16
    finally:
        _srhtable.unlink(table_name)


def _rss_shmem_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/self/status")


def test_prefault_maps_the_whole_table_in_now(name):
    writer = SrhTable.create(name, nslots=4096)   # 4096 * (64 + 1024) bytes: 4.25 MiB
    try:
        before = _rss_shmem_kib()
        assert writer.prefault() is True
        grown = _rss_shmem_kib() - before
        assert grown >= 4096 * (64 + 1024) // 1024 - 4
        reader = SrhTable.attach(name)
        try:
            assert reader.prefault() is True    # read-only mapping: populated for reading
        finally:
            reader.close()
    finally:
        writer.close()

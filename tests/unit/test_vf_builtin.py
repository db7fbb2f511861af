"""The C functions of srv6pipes._vf: the built-ins (cext/vf_builtin.h), the C module loader
and the FunctionDriver that runs a descriptor the way the relay does.

Every function runs through FunctionDriver, so each test also checks that the function
keeps the streaming contract of cext/srv6pipes_vf.h (bounded output, consumption, EOF).
"""
import ctypes
import ipaddress
import os
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes import _vf
from srv6pipes.modules import module_path
from srv6pipes.vfapi import DOWN, UP
from tests.support.cmodules import MODULES, build_c_module
from tests.support.vfharness import text_like

BUILTIN = {d["name"]: d for d in _vf.BUILTIN_FUNCTIONS}
ADDRESS = {name: d["address"] for name, d in BUILTIN.items()}
MIB = 1 << 20

chunk_sizes = st.lists(st.integers(1, 5000), min_size=1, max_size=8)
caps = st.sampled_from([1, 7, 64, 1000, 4096, 65536])


def run(address, params, direction, data, *, chunks=None, out_cap=65536, in_cap=65536,
        **flow):
    """One direction of a fresh flow, fed and finished: everything it output."""
    with _vf.FunctionDriver(address, params, **flow) as driver:
        return (driver.feed(direction, data, chunks=chunks, out_cap=out_cap, in_cap=in_cap)
                + driver.finish(direction, out_cap=out_cap))


def xor_reference(data, key):
    return data.translate(bytes(i ^ key for i in range(256)))


# -- the table ---------------------------------------------------------------------------

def test_builtin_table():
    assert {d["id"]: d["name"] for d in _vf.BUILTIN_FUNCTIONS} == {
        1: "xor", 2: "xor-passes", 3: "compress", 4: "decompress", 7: "dpi", 8: "count"}
    inplace = {d["name"] for d in _vf.BUILTIN_FUNCTIONS if d["flags"] & _vf.INPLACE}
    assert inplace == {"xor", "xor-passes", "dpi", "count"}
    assert all(d["description"] and d["address"] for d in _vf.BUILTIN_FUNCTIONS)
    assert len({d["address"] for d in _vf.BUILTIN_FUNCTIONS}) == len(_vf.BUILTIN_FUNCTIONS)


# -- xor, xor-passes ---------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000), key=st.integers(0, 255), chunks=chunk_sizes,
       direction=st.sampled_from([UP, DOWN]))
def test_xor_matches_reference_and_roundtrips(data, key, chunks, direction):
    out = run(ADDRESS["xor"], key, direction, data, chunks=chunks)
    assert out == xor_reference(data, key)
    assert run(ADDRESS["xor"], key, 1 - direction, out, chunks=chunks) == data


def test_xor_uses_only_the_low_byte():
    assert run(ADDRESS["xor"], 0x1234, UP, b"abc") == xor_reference(b"abc", 0x34)


@pytest.mark.parametrize("n", range(1, 9))
def test_xor_passes_is_identity(n):
    data = os.urandom(100_000)
    for key in (0, 0x01, 0xff):
        assert run(ADDRESS["xor-passes"], (key << 8) | n, UP, data, chunks=[65536, 999]) \
            == data


# -- compress, decompress ----------------------------------------------------------------

def through(first, second, direction, data, *, chunks=None, out_cap=65536, in_cap=65536):
    """data through two drivers in a row (as P1 then P2), each fed and finished."""
    middle = (first.feed(direction, data, chunks=chunks, out_cap=out_cap, in_cap=in_cap)
              + first.finish(direction, out_cap=out_cap))
    return middle, (second.feed(direction, middle, chunks=chunks, out_cap=out_cap,
                                in_cap=in_cap)
                    + second.finish(direction, out_cap=out_cap))


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(st.binary(max_size=30000),
                      st.integers(0, 200000).map(text_like)),
       chunks=chunk_sizes, out_cap=caps, in_cap=st.sampled_from([1, 100, 65536]),
       level=st.integers(0, 15))
def test_compress_decompress_roundtrip_both_directions(data, chunks, out_cap, in_cap, level):
    with _vf.FunctionDriver(ADDRESS["compress"], level) as p1, \
            _vf.FunctionDriver(ADDRESS["decompress"], level) as p2:
        wire, up = through(p1, p2, UP, data, chunks=chunks, out_cap=out_cap, in_cap=in_cap)
        assert up == data
        if data:
            assert zlib.decompress(wire, -15) == data     # plain raw deflate on the wire
        else:
            assert wire == b""    # an empty direction stays empty
        _, down = through(p2, p1, DOWN, data, chunks=chunks, out_cap=out_cap, in_cap=in_cap)
        assert down == data


def test_compress_large_incompressible():
    data = os.urandom(3 * MIB)
    with _vf.FunctionDriver(ADDRESS["compress"], 1) as p1, \
            _vf.FunctionDriver(ADDRESS["decompress"], 1) as p2:
        wire, out = through(p1, p2, UP, data)
    assert out == data
    assert len(wire) < len(data) * 1.01


def test_decompress_output_is_bounded():
    """10 MB of zeros compress to about 10 KB; decompressing with 4 KiB of output room per
    call works (the driver fails any call that returns more than out_cap)."""
    data = bytes(10_000_000)
    wire = run(ADDRESS["compress"], 9, UP, data)
    assert len(wire) < 20_000
    assert run(ADDRESS["decompress"], 0, UP, wire, out_cap=4096) == data
    # the same wire bytes as one small arrival, and in tiny arrivals
    assert run(ADDRESS["decompress"], 0, UP, wire, out_cap=4096, chunks=[3]) == data


def test_compress_flushes_the_end_at_eof():
    with _vf.FunctionDriver(ADDRESS["compress"], 6) as p1:
        before = p1.feed(UP, b"hello")
        end = p1.finish(UP)
    unpacker = zlib.decompressobj(-15)
    assert unpacker.decompress(before) == b"hello" and not unpacker.eof
    assert unpacker.decompress(end) == b"" and unpacker.eof


def test_an_empty_direction_stays_empty():
    """Nothing sent: no stream at all (as without the proxy), and the peer accepts that."""
    assert run(ADDRESS["compress"], 6, UP, b"") == b""
    assert run(ADDRESS["decompress"], 6, UP, b"") == b""
    assert run(ADDRESS["decompress"], 6, DOWN, b"") == b""


def test_compress_is_interactive():
    """Every arrival is flushed: the peer decompresses it at once, before any EOF."""
    with _vf.FunctionDriver(ADDRESS["compress"], 6) as p1, \
            _vf.FunctionDriver(ADDRESS["decompress"], 6) as p2:
        for message in (b"GET / HTTP/1.1\r\n\r\n", b"x", b"HTTP/1.1 200 OK\r\n" * 20):
            wire = p1.feed(UP, message)
            assert wire
            assert p2.feed(UP, wire) == message
        # the same for decompress's own compressing direction (down)
        assert p1.feed(DOWN, p2.feed(DOWN, b"pong")) == b"pong"


def test_decompress_rejects_a_truncated_stream():
    wire = run(ADDRESS["compress"], 6, UP, text_like(50_000))
    with _vf.FunctionDriver(ADDRESS["decompress"], 0) as p2:
        p2.feed(UP, wire[:-1])
        with pytest.raises(_vf.FlowError):
            p2.finish(UP)
    with _vf.FunctionDriver(ADDRESS["decompress"], 0) as p2:   # just the first byte
        p2.feed(UP, wire[:1])
        with pytest.raises(_vf.FlowError):
            p2.finish(UP)


def test_decompress_rejects_bytes_after_the_stream():
    wire = run(ADDRESS["compress"], 6, UP, b"payload")
    with pytest.raises(_vf.FlowError):
        run(ADDRESS["decompress"], 0, UP, wire + b"junk")
    with _vf.FunctionDriver(ADDRESS["decompress"], 0) as p2:   # in a later arrival
        assert p2.feed(UP, wire) == b"payload"
        with pytest.raises(_vf.FlowError):
            p2.feed(UP, b"x")


def test_decompress_rejects_garbage():
    with pytest.raises(_vf.FlowError):
        run(ADDRESS["decompress"], 0, UP, b"\xff" * 100)


# -- dpi ---------------------------------------------------------------------------------

@pytest.fixture
def patterns():
    """set_dpi_patterns for one test; no patterns again afterwards."""
    yield _vf.set_dpi_patterns
    _vf.set_dpi_patterns([])


def dpi_blocks(data, chunks=None, direction=UP):
    try:
        assert run(ADDRESS["dpi"], 0, direction, data, chunks=chunks) == data
    except _vf.FlowReset:
        return True
    return False


def test_dpi_without_patterns_forwards_everything():
    _vf.set_dpi_patterns([])
    data = os.urandom(200_000)
    assert run(ADDRESS["dpi"], 0, UP, data) == data


def test_dpi_finds_a_pattern_within_a_chunk(patterns):
    patterns([b"attack"])
    before = _vf.dpi_counters()
    assert dpi_blocks(b"GET /attack HTTP/1.1")
    assert dpi_blocks(b"attack", direction=DOWN)
    after = _vf.dpi_counters()
    assert after["flows_blocked"] == before["flows_blocked"] + 2
    assert after["bytes_scanned"] >= before["bytes_scanned"] + 26


def test_dpi_finds_a_pattern_across_chunks(patterns):
    pattern = b"0123456789abcdef"
    patterns([pattern])
    data = b"x" * 1000 + pattern + b"y" * 1000
    for split in range(1000, 1000 + len(pattern) + 1):
        assert dpi_blocks(data, chunks=[split, 1, 2000])
    assert dpi_blocks(data, chunks=[1])


def test_dpi_passes_clean_traffic(patterns):
    patterns([b"attack", b"evil"])
    data = b"attac evi attacK Evil " * 5000
    assert not dpi_blocks(data, chunks=[7, 4096])


def test_dpi_keeps_state_per_direction(patterns):
    patterns([b"evil"])
    with _vf.FunctionDriver(ADDRESS["dpi"], 0) as flow:
        assert flow.feed(UP, b"ev") == b"ev"
        assert flow.feed(DOWN, b"il") == b"il"
        with pytest.raises(_vf.FlowReset):
            flow.feed(UP, b"il")


def test_dpi_multiple_and_overlapping_patterns(patterns):
    patterns([b"he", b"she", b"his", b"hers", b"abcd", b"bc"])
    assert dpi_blocks(b"ushers")
    assert dpi_blocks(b"xabce")          # bc inside a longer pattern's prefix
    assert dpi_blocks(b"ahis")
    assert not dpi_blocks(b"sh hi abd")


@settings(max_examples=150, deadline=None)
@given(pattern_set=st.lists(st.binary(min_size=1, max_size=5).map(
           lambda b: bytes(97 + c % 3 for c in b)), min_size=1, max_size=6),
       text=st.binary(max_size=300).map(lambda b: bytes(97 + c % 4 for c in b)),
       chunks=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_dpi_matches_the_reference(pattern_set, text, chunks):
    """Small alphabets make overlaps and failure links likely; the reference is `in`."""
    _vf.set_dpi_patterns(pattern_set)
    try:
        assert dpi_blocks(text, chunks=chunks) == any(p in text for p in pattern_set)
    finally:
        _vf.set_dpi_patterns([])


def test_dpi_running_flows_keep_their_pattern_set(patterns):
    patterns([b"old"])
    with _vf.FunctionDriver(ADDRESS["dpi"], 0) as early:
        patterns([b"new"])
        with _vf.FunctionDriver(ADDRESS["dpi"], 0) as late:
            assert early.feed(UP, b"new") == b"new"
            assert late.feed(UP, b"old") == b"old"
            with pytest.raises(_vf.FlowReset):
                early.feed(UP, b"old")
            with pytest.raises(_vf.FlowReset):
                late.feed(UP, b"new")
        patterns([])
        # the replaced sets are freed with the last flow using them
        with _vf.FunctionDriver(ADDRESS["dpi"], 0) as unfiltered:
            assert unfiltered.feed(UP, b"old new") == b"old new"


def test_dpi_all_byte_values(patterns):
    patterns([bytes([b]) + b"\x00" for b in range(256)])
    assert dpi_blocks(b"\xff\x00")
    assert not dpi_blocks(bytes(range(1, 256)))


def test_dpi_refuses_bad_pattern_sets(patterns):
    patterns([b"keep"])
    with pytest.raises(ValueError):
        _vf.set_dpi_patterns([b""])
    with pytest.raises(ValueError):
        _vf.set_dpi_patterns([b"x" * 256])
    with pytest.raises(ValueError):
        _vf.set_dpi_patterns([b"p%d" % i for i in range(1025)])
    with pytest.raises(TypeError):
        _vf.set_dpi_patterns(["text"])
    rng = random.Random(1)
    with pytest.raises(ValueError, match="MiB"):   # 1024 x 255 random bytes: too large
        _vf.set_dpi_patterns([rng.randbytes(255) for _ in range(1024)])
    assert dpi_blocks(b"keep")                       # the set in force is unchanged


def test_dpi_accepts_the_largest_pattern_counts(patterns):
    patterns([b"%04d" % i + b"x" * 200 for i in range(1024)])
    assert dpi_blocks(b"..0999" + b"x" * 200)
    assert not dpi_blocks(b"0999" + b"x" * 199)


# -- count -------------------------------------------------------------------------------

@pytest.fixture
def counts():
    _vf.count_clear()
    yield
    _vf.count_clear()


def test_count_per_prefix(counts):
    a1, a2 = "2001:db8:a::1", ipaddress.IPv6Address("2001:db8:a::2")
    b1 = ipaddress.IPv6Address("2001:db8:b::1").packed
    run(ADDRESS["count"], 0, UP, b"x" * 100, client=a1)
    run(ADDRESS["count"], 0, DOWN, b"y" * 50, client=a2)
    with _vf.FunctionDriver(ADDRESS["count"], 0, client=b1) as flow:
        assert flow.feed(UP, b"abc") == b"abc"
        flow.feed(DOWN, b"defg")
        assert _vf.count_snapshot() == [
            {"prefix": "2001:db8:a::/64", "flows": 2, "active": 0, "bytes_up": 100,
             "bytes_down": 50},
            {"prefix": "2001:db8:b::/64", "flows": 1, "active": 1, "bytes_up": 3,
             "bytes_down": 4},
        ]
        with pytest.raises(RuntimeError):
            _vf.count_clear()   # the running flow points into the table
    assert _vf.count_snapshot()[1]["active"] == 0


def test_count_prefix_lengths(counts):
    address = "2001:db8:1:2:3:4:5:6"
    for params in (48, 0x100 | 48, 127, 128, 200, 1):
        run(ADDRESS["count"], params, UP, b"z", client=address)
    assert [row["prefix"] for row in _vf.count_snapshot()] == [
        "::/1", "2001:db8:1::/48", "2001:db8:1:2:3:4:5:6/127", "2001:db8:1:2:3:4:5:6/128"]
    assert [row["flows"] for row in _vf.count_snapshot()] == [1, 2, 1, 2]


def test_count_full_table_goes_to_other(counts):
    for i in range(4096):
        run(ADDRESS["count"], 128, UP, b"", client=(1 << 64 | i).to_bytes(16, "big"))
    run(ADDRESS["count"], 128, UP, b"late", client="2001:db8::1")
    snapshot = _vf.count_snapshot()
    assert len(snapshot) == 4097
    assert snapshot[-1] == {"prefix": "other", "flows": 1, "active": 0, "bytes_up": 4,
                            "bytes_down": 0}
    run(ADDRESS["count"], 128, UP, b"again", client=(1 << 64).to_bytes(16, "big"))
    assert _vf.count_snapshot()[0]["flows"] == 2   # known prefixes still find their slot


# -- the C module loader -----------------------------------------------------------------

@pytest.fixture
def caesar():
    path = module_path("vf_caesar")
    assert os.path.exists(path), "build the package first: pip install -e ."
    module = _vf.load_c_module(path)
    module.init()
    yield module
    module.close()


def test_caesar_example_roundtrip(caesar):
    by_name = {f["name"]: f for f in caesar.functions}
    assert (by_name["caesar"]["id"], by_name["uncaesar"]["id"]) == (0x100, 0x101)
    assert by_name["uncaesar"]["flags"] & _vf.INPLACE
    assert not by_name["caesar"]["flags"] & _vf.INPLACE
    data = os.urandom(100_000)
    with _vf.FunctionDriver(by_name["caesar"]["address"], 3) as p1, \
            _vf.FunctionDriver(by_name["uncaesar"]["address"], 3) as p2:
        wire = p1.feed(UP, data, chunks=[1000, 7], out_cap=100) + p1.finish(UP)
        assert wire == bytes((b + 3) % 256 for b in data)
        assert p2.feed(UP, wire) + p2.finish(UP) == data
        assert p1.feed(DOWN, p2.feed(DOWN, data), out_cap=4096) == data
        stats = ctypes.CDLL(caesar.path)   # the same library: its counters
        assert ctypes.c_uint64.in_dll(stats, "caesar_flows_spawned").value == 2
        assert ctypes.c_uint64.in_dll(stats, "caesar_flows_live").value == 2
    assert ctypes.c_uint64.in_dll(stats, "caesar_flows_live").value == 0
    assert ctypes.c_int.in_dll(stats, "caesar_initialised").value == 1


def test_module_close_is_idempotent_and_runs_deinit(caesar):
    stats = ctypes.CDLL(caesar.path)
    caesar.close()
    assert ctypes.c_int.in_dll(stats, "caesar_initialised").value == 0
    caesar.close()
    with pytest.raises(_vf.ModuleError, match="closed"):
        caesar.init()


MODULE_TEMPLATE = r"""
#include <stdlib.h>
#include "srv6pipes_vf.h"
%(abi)s
/* not static: a table may leave any of them unused */
int init_calls, deinit_calls;
int ok_init(void) { init_calls++; return 0; }
int bad_init(void) { return 7; }
void count_deinit(void) { deinit_calls++; }
void *spawn(uint32_t params, const struct pipes_flow_info *flow)
{ (void)params; (void)flow; return PIPES_VF_NO_CONTEXT; }
ssize_t process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                uint8_t *out, size_t out_cap, int flags)
{ (void)ctx; (void)direction; (void)in; (void)out; (void)out_cap; (void)flags;
  return (ssize_t)*in_len; }
%(table)s
"""


def module_source(tmp_path, entries, abi="PIPES_VF_MODULE;", name="mod"):
    """A module whose all_funcs has the given C initialisers; built, returns the path."""
    table = ("const struct pipes_func_desc all_funcs[] = {\n"
             + "".join(f"    {{ {entry} }},\n" for entry in entries) + "    { 0 }\n};")
    source = tmp_path / f"{name}.c"
    source.write_text(MODULE_TEMPLATE % {"abi": abi, "table": table})
    return build_c_module(source, tmp_path)


def entry(id_, name, extra=""):
    return (f'.id = {id_}, .name = "{name}", .spawn = spawn, .process = process, '
            f'.flags = PIPES_VF_INPLACE{extra}')


def test_loader_accepts_a_valid_module(tmp_path):
    path = module_source(tmp_path, [entry(0x300, "one"), entry(0x301, "two")])
    module = _vf.load_c_module(path)
    try:
        assert [(f["id"], f["name"], f["description"]) for f in module.functions] == [
            (0x300, "one", None), (0x301, "two", None)]
        module.init()
        with _vf.FunctionDriver(module.functions[1]["address"], 0) as flow:
            assert flow.feed(UP, b"same") == b"same"
    finally:
        module.close()


@pytest.mark.parametrize("entries, abi, message", [
    ([entry(1, "a"), entry(1, "b")], "PIPES_VF_MODULE;", "share the id 0x1"),
    ([entry(1, "a"), entry(2, "a")], "PIPES_VF_MODULE;", "two functions are named 'a'"),
    ([entry(1, "has space")], "PIPES_VF_MODULE;", "printable characters without spaces"),
    ([entry(1, "x" * 65)], "PIPES_VF_MODULE;", "printable characters without spaces"),
    ([entry(1, "a", ", .spawn = NULL")], "PIPES_VF_MODULE;", "no spawn callback"),
    ([entry(1, "a", ", .process = NULL")], "PIPES_VF_MODULE;", "no process callback"),
    ([entry(1, "a", " | 0x80")], "PIPES_VF_MODULE;", "unknown flags 0x81"),
    ([], "PIPES_VF_MODULE;", "declares no function"),
    ([entry(1, "a")], "const uint32_t pipes_vf_abi = PIPES_VF_ABI + 1;", "built for VF ABI 2"),
    ([entry(1, "a")], "", "no pipes_vf_abi"),
])
def test_loader_refuses_bad_modules(tmp_path, entries, abi, message):
    path = module_source(tmp_path, entries, abi=abi)
    with pytest.raises(_vf.ModuleError, match=message) as info:
        _vf.load_c_module(path)
    assert str(path) in str(info.value)


def test_loader_refuses_a_library_without_all_funcs(tmp_path):
    source = tmp_path / "plain.c"
    source.write_text('#include "srv6pipes_vf.h"\nPIPES_VF_MODULE;\nint answer = 42;\n')
    path = build_c_module(source, tmp_path)
    with pytest.raises(_vf.ModuleError, match="no all_funcs"):
        _vf.load_c_module(path)


def test_loader_reports_dlopen_errors(tmp_path):
    with pytest.raises(_vf.ModuleError, match="dlopen failed.*No such file"):
        _vf.load_c_module(tmp_path / "missing.so")
    (tmp_path / "text.so").write_text("not a library")
    with pytest.raises(_vf.ModuleError, match="text.so: dlopen failed"):
        _vf.load_c_module(tmp_path / "text.so")


def test_init_failure_undoes_the_inits_that_ran(tmp_path):
    path = module_source(tmp_path, [
        entry(1, "a", ", .init = ok_init, .deinit = count_deinit"),
        entry(2, "b", ", .init = ok_init, .deinit = count_deinit"),   # same pointers: once
        entry(3, "c", ", .init = bad_init, .deinit = count_deinit"),
    ])
    library = ctypes.CDLL(str(path))   # keeps the library (and its counters) loaded
    module = _vf.load_c_module(path)
    with pytest.raises(_vf.ModuleError, match=r"init of 'c' failed \(7\)"):
        module.init()
    assert ctypes.c_int.in_dll(library, "init_calls").value == 1
    assert ctypes.c_int.in_dll(library, "deinit_calls").value == 1
    module.close()   # init did not succeed: no deinit again
    assert ctypes.c_int.in_dll(library, "deinit_calls").value == 1


def test_init_and_deinit_run_once_per_pointer(tmp_path):
    path = module_source(tmp_path, [
        entry(1, "a", ", .init = ok_init, .deinit = count_deinit"),
        entry(2, "b", ", .init = ok_init, .deinit = count_deinit"),
        entry(3, "c"),
    ])
    library = ctypes.CDLL(str(path))
    module = _vf.load_c_module(path)
    module.init()
    module.init()   # already initialised: nothing
    module.close()
    assert ctypes.c_int.in_dll(library, "init_calls").value == 1
    assert ctypes.c_int.in_dll(library, "deinit_calls").value == 1


# -- the driver's contract checks --------------------------------------------------------

BROKEN_SOURCE = r"""
#include "srv6pipes_vf.h"
PIPES_VF_MODULE;
static void *spawn(uint32_t params, const struct pipes_flow_info *flow)
{ (void)flow; return params ? NULL : PIPES_VF_NO_CONTEXT; }
/* consumes nothing, ever */
static ssize_t sulk(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                    uint8_t *out, size_t out_cap, int flags)
{ (void)ctx; (void)direction; (void)in; (void)out; (void)out_cap; (void)flags;
  *in_len = 0; return 0; }
/* claims one byte more output than there was room for */
static ssize_t overflow(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                        uint8_t *out, size_t out_cap, int flags)
{ (void)ctx; (void)direction; (void)in; (void)out; (void)flags;
  *in_len = 0; return (ssize_t)out_cap + 1; }
/* an INPLACE function that keeps the last byte */
static ssize_t short_inplace(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                             uint8_t *out, size_t out_cap, int flags)
{ (void)ctx; (void)direction; (void)in; (void)out; (void)out_cap; (void)flags;
  *in_len -= 1; return (ssize_t)*in_len; }
static ssize_t fails(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                     uint8_t *out, size_t out_cap, int flags)
{ (void)ctx; (void)direction; (void)in; (void)in_len; (void)out; (void)out_cap;
  (void)flags; return PIPES_VF_ERROR; }
const struct pipes_func_desc all_funcs[] = {
    { .id = 1, .name = "sulk", .spawn = spawn, .process = sulk },
    { .id = 2, .name = "overflow", .spawn = spawn, .process = overflow },
    { .id = 3, .name = "short-inplace", .flags = PIPES_VF_INPLACE, .spawn = spawn,
      .process = short_inplace },
    { .id = 4, .name = "fails", .spawn = spawn, .process = fails },
    { 0 }
};
"""


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("broken")
    source = tmp_path / "broken.c"
    source.write_text(BROKEN_SOURCE)
    module = _vf.load_c_module(build_c_module(source, tmp_path))
    yield {f["name"]: f["address"] for f in module.functions}
    module.close()


def test_driver_detects_a_stall(broken):
    with _vf.FunctionDriver(broken["sulk"], 0) as flow:
        assert flow.feed(UP, b"x" * 100, in_cap=1000) == b""   # waiting for more: fine
        with pytest.raises(_vf.FlowError, match="stalls on a full input buffer"):
            flow.feed(UP, b"x" * 900, in_cap=1000)
        with pytest.raises(_vf.FlowError, match="reset"):
            flow.feed(UP, b"x")                                # the flow is over
    with _vf.FunctionDriver(broken["sulk"], 0) as flow:
        flow.feed(DOWN, b"abc")
        with pytest.raises(_vf.FlowError, match="at EOF process will not take the input left: the last 3 bytes"):
            flow.finish(DOWN)


def test_driver_detects_broken_results(broken):
    with _vf.FunctionDriver(broken["overflow"], 0) as flow:
        with pytest.raises(_vf.FlowError, match="out_cap"):
            flow.feed(UP, b"x")
    with _vf.FunctionDriver(broken["short-inplace"], 0) as flow:
        with pytest.raises(_vf.FlowError, match="INPLACE"):
            flow.feed(UP, b"xy")
    with _vf.FunctionDriver(broken["fails"], 0) as flow:
        with pytest.raises(_vf.FlowError, match="PIPES_VF_ERROR"):
            flow.feed(UP, b"x")


def test_driver_spawn_refusal_and_close(broken):
    with pytest.raises(_vf.FlowReset, match="spawn"):
        _vf.FunctionDriver(broken["sulk"], 1)
    flow = _vf.FunctionDriver(ADDRESS["xor"], 1)
    flow.close()
    flow.close()
    with pytest.raises(_vf.FlowError):
        flow.feed(UP, b"x")
    with pytest.raises(ValueError):
        _vf.FunctionDriver(ADDRESS["xor"], 1).feed(2, b"x")
    with pytest.raises(ValueError):
        _vf.FunctionDriver(ADDRESS["xor"], 1, client=b"short")
    with pytest.raises(OverflowError):
        _vf.FunctionDriver(ADDRESS["xor"], 1 << 32)


# -- chaos-c -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    module = _vf.load_c_module(build_c_module(MODULES / "chaos_c.c",
                                              tmp_path_factory.mktemp("chaos")))
    module.init()
    assert [(f["id"], f["name"]) for f in module.functions] == [(0x7F01, "chaos-c")]
    yield module.functions[0]["address"]
    module.close()


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=50000), chunks=chunk_sizes, out_cap=caps,
       in_cap=st.sampled_from([1, 10, 4096, 65536]), params=st.integers(0, 0xffff),
       port=st.integers(0, 0xffff))
def test_chaos_c_is_identity(chaos, data, chunks, out_cap, in_cap, params, port):
    for direction in (UP, DOWN):
        assert run(chaos, params, direction, data, chunks=chunks, out_cap=out_cap,
                   in_cap=in_cap, client_port=port) == data


def test_chaos_c_holds_back_and_flushes_at_eof(chaos):
    """Partial consumption leaves bytes in the driver's buffer until more come or EOF."""
    data = os.urandom(200_000)
    held_back = 0
    for port in range(20):
        with _vf.FunctionDriver(chaos, 1, client_port=port) as flow:
            early = flow.feed(UP, data, chunks=[1000, 3])
            held_back += len(data) - len(early)
            assert early + flow.finish(UP) == data
    assert held_back > 0

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""C virtual functions (VFs) in one process: the built-ins, loaded modules, and a driver.

Everything here follows the C ABI of cext/srv6pipes_vf.h.

Built-in functions (cext/vf_builtin.h): `BUILTIN_FUNCTIONS` describes them as dicts
{"id", "name", "description", "flags", "address"}; the relay calls a descriptor through its
address (a `const struct pipes_func_desc *` as an int), so no Python runs per chunk. Their
process-wide state is managed from Python here:

    set_dpi_patterns(patterns)   the pattern set of new dpi flows
    dpi_counters()               {"flows_blocked", "bytes_scanned"}
    count_snapshot()             the count function's table, one dict per client prefix
    count_clear()                empties it (tests)

Third-party C modules: `load_c_module(path)` dlopens a module and checks its descriptors;
`CModule.init()` runs its init callbacks, `CModule.close()` its deinit callbacks and dlclose.

`FunctionDriver` runs one flow of a descriptor the way the relay does, without sockets: the
reference of the relay's calling contract, used by unit tests and microbenchmarks.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlclose, dlerror, dlopen, dlsym

from srv6pipes_vf cimport (PIPES_VF_ABI, PIPES_VF_EOF, PIPES_VF_ERROR, PIPES_VF_INPLACE,
                           PIPES_VF_RESET, pipes_flow_info, pipes_func_desc)

import ipaddress
import os


cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)


cdef extern from "vf_builtin.h" nogil:
    const pipes_func_desc vf_builtin_funcs[]

    enum:
        VF_DPI_MAX_PATTERNS
        VF_DPI_MAX_PATTERN_LEN
        VF_DPI_MAX_ENTRIES
        VF_DPI_OK
        VF_DPI_TOO_LARGE
        VF_COUNT_SLOTS

    struct vf_dpi_set:
        pass
    uint64_t vf_dpi_flows_blocked
    uint64_t vf_dpi_bytes_scanned
    int vf_dpi_build(const uint8_t *bytes, const uint32_t *lens, size_t n, vf_dpi_set **result)
    void vf_dpi_install(vf_dpi_set *set)

    struct vf_count_entry:
        uint8_t prefix[16]
        uint8_t len
        uint64_t flows
        uint64_t active
        uint64_t bytes[2]
    void vf_count_copy(vf_count_entry *table, vf_count_entry *other)
    int vf_count_clear()


INPLACE = PIPES_VF_INPLACE   # the flag in a function's "flags"

MAX_MODULE_FUNCTIONS = 256
MAX_NAME = 64
MAX_DESCRIPTION = 256


class ModuleError(ValueError):
    """A C module cannot be loaded or initialised; the message names the file and why."""


class FlowReset(Exception):
    """The function reset the flow (spawn returned NULL, or process PIPES_VF_RESET)."""


class FlowError(Exception):
    """The function failed (PIPES_VF_ERROR) or broke the streaming contract."""


cdef dict describe(const pipes_func_desc *desc):
    """The dict of one descriptor (its name is checked already)."""
    description = None
    if desc.description != NULL:
        description = desc.description[:strnlen(desc.description, MAX_DESCRIPTION)].decode(
            "utf-8", "replace")
    return {"id": desc.id, "name": desc.name.decode("ascii"), "description": description,
            "flags": desc.flags, "address": <uintptr_t>desc}


cdef tuple builtin_functions():
    cdef size_t i = 0
    found = []
    while vf_builtin_funcs[i].name != NULL:
        found.append(describe(&vf_builtin_funcs[i]))
        i += 1
    return tuple(found)


BUILTIN_FUNCTIONS = builtin_functions()


# -- dpi ---------------------------------------------------------------------------------

def set_dpi_patterns(patterns):
    """Replaces the dpi function's patterns (bytes-like, 1 to 255 bytes each, at most 1024)
    for the flows spawned from now on; running flows keep the set they started with. An
    empty list: dpi forwards everything. Raises ValueError (and changes nothing) for a bad
    pattern or a set whose automaton would be too large (32 MiB)."""
    cdef vf_dpi_set *built = NULL
    cdef uint32_t *lens
    cdef const uint8_t *data
    cdef size_t i, n
    cdef int rc
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, (bytes, bytearray, memoryview)):
            raise TypeError(f"a dpi pattern is bytes, not {type(pattern).__name__}")
    patterns = [bytes(pattern) for pattern in patterns]
    n = len(patterns)
    if n > VF_DPI_MAX_PATTERNS:
        raise ValueError(f"{n} dpi patterns: at most {VF_DPI_MAX_PATTERNS}")
    for pattern in patterns:
        if not 1 <= len(pattern) <= VF_DPI_MAX_PATTERN_LEN:
            raise ValueError(f"a dpi pattern has 1 to {VF_DPI_MAX_PATTERN_LEN} bytes, "
                             f"not {len(pattern)}: {pattern[:32]!r}")
    if n == 0:
        vf_dpi_install(NULL)
        return
    joined = b"".join(patterns)
    data = joined
    lens = <uint32_t *>malloc(n * sizeof(uint32_t))
    if lens == NULL:
        raise MemoryError()
    for i in range(n):
        lens[i] = len(patterns[i])
    with nogil:
        rc = vf_dpi_build(data, lens, n, &built)
    free(lens)
    if rc == VF_DPI_TOO_LARGE:
        raise ValueError(f"{n} dpi patterns of {len(joined)} bytes are too many: the "
                         f"automaton would need more than {VF_DPI_MAX_ENTRIES * 4 >> 20} MiB")
    if rc != VF_DPI_OK:
        raise MemoryError()
    vf_dpi_install(built)


def dpi_counters():
    """{"flows_blocked": flows reset on a match, "bytes_scanned": bytes run through a
    pattern set} in this process."""
    return {"flows_blocked": vf_dpi_flows_blocked, "bytes_scanned": vf_dpi_bytes_scanned}


# -- count -------------------------------------------------------------------------------

cdef dict count_row(str prefix, vf_count_entry *e):
    return {"prefix": prefix, "flows": e.flows, "active": e.active,
            "bytes_up": e.bytes[0], "bytes_down": e.bytes[1]}


def count_snapshot():
    """The count function's table in this process: a list of {"prefix": "2001:db8::/64",
    "flows", "active", "bytes_up", "bytes_down"}, sorted by prefix, then {"prefix": "other",
    ...} for the flows that found the table full, if any."""
    cdef vf_count_entry *table = <vf_count_entry *>malloc(
        VF_COUNT_SLOTS * sizeof(vf_count_entry))
    cdef vf_count_entry other
    cdef vf_count_entry *e
    cdef size_t i
    if table == NULL:
        raise MemoryError()
    try:
        vf_count_copy(table, &other)   # a consistent copy, taken under the lock
        rows = []
        for i in range(<size_t>VF_COUNT_SLOTS):
            e = &table[i]
            if e.len:
                network = ipaddress.IPv6Network(((<char *>e.prefix)[:16], e.len))
                rows.append((int(network.network_address), e.len,
                             count_row(str(network), e)))
    finally:
        free(table)
    rows.sort(key=lambda row: row[:2])
    snapshot = [row[2] for row in rows]
    if other.flows:
        snapshot.append(count_row("other", &other))
    return snapshot


def count_clear():
    """Forgets every prefix and counter. Only while no count flow runs: their contexts point
    into the table (RuntimeError otherwise)."""
    if vf_count_clear() < 0:
        raise RuntimeError("count flows are running: the table cannot be cleared")


# -- C modules ---------------------------------------------------------------------------

cdef str dl_error():
    cdef const char *text = dlerror()
    return text.decode("utf-8", "replace") if text != NULL else "unknown error"


cdef class CModule:
    """A C VF module loaded with dlopen (see load_c_module). `functions` lists its
    descriptors like BUILTIN_FUNCTIONS. Dropping the object without close() leaves the
    library loaded: flows may still run its code."""

    cdef void *handle
    cdef const pipes_func_desc *funcs
    cdef size_t count
    cdef bint initialised
    cdef readonly str path
    cdef readonly list functions

    cdef check(self):
        """Validates the module's symbols and descriptors; fills `functions`."""
        cdef const uint32_t *abi = <const uint32_t *>dlsym(self.handle, "pipes_vf_abi")
        cdef const pipes_func_desc *d
        cdef size_t i, n
        path = self.path
        if abi == NULL:
            raise ModuleError(f"{path}: no pipes_vf_abi symbol (put PIPES_VF_MODULE; in "
                              f"the module's source)")
        if abi[0] != PIPES_VF_ABI:
            raise ModuleError(f"{path}: built for VF ABI {abi[0]}, this SRv6Pipes loads "
                              f"ABI {PIPES_VF_ABI}")
        self.funcs = <const pipes_func_desc *>dlsym(self.handle, "all_funcs")
        if self.funcs == NULL:
            raise ModuleError(f"{path}: no all_funcs (the array of function descriptors)")
        while self.funcs[self.count].name != NULL:
            self.count += 1
            if self.count > MAX_MODULE_FUNCTIONS:
                raise ModuleError(f"{path}: all_funcs has no end entry (name NULL) within "
                                  f"{MAX_MODULE_FUNCTIONS} functions")
        if self.count == 0:
            raise ModuleError(f"{path}: all_funcs declares no function")
        ids = {}
        self.functions = []
        for i in range(self.count):
            d = &self.funcs[i]
            n = strnlen(d.name, MAX_NAME + 1)
            name = d.name[:n]
            if not 1 <= n <= MAX_NAME or not all(0x21 <= c <= 0x7e for c in name):
                raise ModuleError(f"{path}: all_funcs[{i}]: the name {name!r} is not 1 to "
                                  f"{MAX_NAME} printable characters without spaces")
            name = name.decode("ascii")
            if d.spawn == NULL or d.process == NULL:
                raise ModuleError(f"{path}: function {name!r} has no "
                                  f"{'spawn' if d.spawn == NULL else 'process'} callback")
            if d.flags & ~PIPES_VF_INPLACE:
                raise ModuleError(f"{path}: function {name!r} has unknown flags {d.flags:#x}")
            if d.id in ids:
                raise ModuleError(f"{path}: functions {ids[d.id]!r} and {name!r} share the "
                                  f"id {d.id:#x}")
            if name in ids.values():
                raise ModuleError(f"{path}: two functions are named {name!r}")
            ids[d.id] = name
            self.functions.append(describe(d))

    def init(self):
        """Runs each distinct init callback once (the module's per-process set-up), before
        any flow. A non-zero return undoes the inits that succeeded (their deinit
        callbacks) and raises ModuleError; close() is still needed then."""
        cdef size_t i
        cdef int rc
        if self.handle == NULL:
            raise ModuleError(f"{self.path}: the module is closed")
        if self.initialised:
            return
        ran = set()
        done = []   # entries whose init ran (and succeeded)
        for i in range(self.count):
            if self.funcs[i].init == NULL:
                continue
            if <uintptr_t>self.funcs[i].init not in ran:
                ran.add(<uintptr_t>self.funcs[i].init)
                rc = self.funcs[i].init()
                if rc != 0:
                    self.deinit(done)
                    raise ModuleError(f"{self.path}: init of {self.functions[i]['name']!r} "
                                      f"failed ({rc})")
            done.append(i)
        self.initialised = True

    cdef deinit(self, entries):
        """Runs the distinct deinit callbacks of the given entries, once each."""
        cdef size_t i
        ran = set()
        for i in entries:
            if self.funcs[i].deinit != NULL and <uintptr_t>self.funcs[i].deinit not in ran:
                ran.add(<uintptr_t>self.funcs[i].deinit)
                self.funcs[i].deinit()

    def close(self):
        """Runs each distinct deinit callback once (if init() succeeded) and unloads the
        library. Only once no flow uses its functions. Idempotent."""
        if self.handle == NULL:
            return
        if self.initialised:
            self.deinit(range(self.count))
            self.initialised = False
        dlclose(self.handle)
        self.handle = NULL
        self.funcs = NULL
        self.count = 0

    def __repr__(self):
        return f"<CModule {self.path} {[f['name'] for f in self.functions or ()]}>"


def load_c_module(path):
    """Loads the C VF module at path (dlopen, RTLD_NOW | RTLD_LOCAL) and checks it: the
    ABI version, all_funcs, every descriptor (name, callbacks, flags, unique ids and names).
    Does not run init (CModule.init). Raises ModuleError naming the path and the problem."""
    cdef CModule module = CModule.__new__(CModule)
    # Absolute: dlopen looks a name without a slash up in the library search path.
    module.path = os.path.abspath(os.fsdecode(path))
    module.handle = dlopen(os.fsencode(module.path), RTLD_NOW | RTLD_LOCAL)
    if module.handle == NULL:
        raise ModuleError(f"{module.path}: dlopen failed: {dl_error()}")
    try:
        module.check()
    except BaseException:
        dlclose(module.handle)
        module.handle = NULL
        raise
    return module


# -- the driver --------------------------------------------------------------------------

cdef struct Direction:
    uint8_t *buf          # the input buffer: `pending` unconsumed bytes at buf + start
    size_t cap, start, pending
    bint starved          # the last call took nothing: wait for new input
    bint finished         # EOF processed: the FIN would be forwarded


cdef int append(bytearray output, const uint8_t *data, size_t n) except -1:
    cdef Py_ssize_t size = len(output)
    PyByteArray_Resize(output, size + <Py_ssize_t>n)
    memcpy(PyByteArray_AS_STRING(output) + size, data, n)
    return 0


cdef int resize(uint8_t **buf, size_t *cap, size_t want) except -1:
    cdef uint8_t *grown
    if want != cap[0]:
        grown = <uint8_t *>realloc(buf[0], want)
        if grown == NULL:
            raise MemoryError()
        buf[0] = grown
        cap[0] = want
    return 0


cdef bytes address16(value):
    """An IPv6 address given as 16 bytes, text or IPv6Address: its 16 bytes."""
    return ipaddress.IPv6Address(value).packed


cdef class FunctionDriver:
    """One flow of a C function, driven the way the relay drives it, without sockets.

    FunctionDriver(address, params, client=..., client_port=0, server=..., server_port=0,
    function_address=...) spawns the descriptor at `address` (from BUILTIN_FUNCTIONS or a
    CModule's functions; its module must stay loaded until close()). Addresses are 16 bytes
    (default: all zero), text or IPv6Address. A NULL context raises FlowReset.

    Per direction, like the relay's stream path:
      - an input buffer of in_cap bytes holds what the function has not consumed; each
        arrival is read into the room left (in pieces if larger), unconsumed bytes are moved
        to the front only when they reach the end of the buffer;
      - process is called with all unconsumed bytes and out_cap bytes of output room: again
        while its output filled out_cap (it may hold more, even with no input left), and
        while it consumed or produced something and input is left;
      - a call that consumes and produces nothing means "waiting for more input"; with a
        full input buffer it can never progress: FlowError (the relay resets);
      - PIPES_VF_INPLACE functions get each arrival in place (out == in, out_cap == in_len)
        and must return in_len; they are never called with PIPES_VF_EOF;
      - at EOF (finish) process is called with PIPES_VF_EOF until a call consumes and
        produces nothing; input left then is an error.
    PIPES_VF_RESET raises FlowReset, PIPES_VF_ERROR or a broken contract FlowError; either
    way only close() is left to do.
    """

    cdef const pipes_func_desc *desc
    cdef void *ctx
    cdef bint live          # spawned and not despawned yet
    cdef bint broken        # reset or failed
    cdef Direction dirs[2]
    cdef uint8_t *obuf
    cdef size_t ocap
    cdef readonly str name

    def __cinit__(self, uintptr_t address, uint32_t params, client=b"\0" * 16,
                  int client_port=0, server=b"\0" * 16, int server_port=0,
                  function_address=b"\0" * 16):
        cdef pipes_flow_info flow
        cdef bytes client16 = address16(client)
        cdef bytes server16 = address16(server)
        cdef bytes function16 = address16(function_address)
        if address == 0:
            raise ValueError("no function descriptor at address 0")
        memset(&flow, 0, sizeof(flow))
        memcpy(flow.client, <const char *>client16, 16)
        memcpy(flow.server, <const char *>server16, 16)
        memcpy(flow.function_address, <const char *>function16, 16)
        if not 0 <= client_port <= 0xffff or not 0 <= server_port <= 0xffff:
            raise ValueError("a port is 0 to 65535")
        flow.client_port = client_port
        flow.server_port = server_port
        flow.params = params
        # Buffers first: process always gets real pointers, even for empty input.
        resize(&self.dirs[0].buf, &self.dirs[0].cap, 65536)
        resize(&self.dirs[1].buf, &self.dirs[1].cap, 65536)
        resize(&self.obuf, &self.ocap, 65536)
        self.desc = <const pipes_func_desc *>address
        self.name = self.desc.name.decode("ascii", "replace")
        self.ctx = self.desc.spawn(params, &flow)
        if self.ctx == NULL:
            raise FlowReset(f"{self.name}: spawn refused the flow")
        self.live = True

    def __dealloc__(self):
        self.despawn()
        free(self.dirs[0].buf)
        free(self.dirs[1].buf)
        free(self.obuf)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Despawns the flow (idempotent)."""
        self.despawn()

    cdef void despawn(self) noexcept:
        if self.live:
            self.live = False
            if self.desc.despawn != NULL:
                self.desc.despawn(self.ctx)

    cdef Direction *direction(self, int direction) except NULL:
        if direction != 0 and direction != 1:
            raise ValueError(f"direction is 0 (up) or 1 (down), not {direction}")
        if not self.live or self.broken:
            raise FlowError(f"{self.name}: the flow is closed or was reset")
        if self.dirs[direction].finished:
            raise ValueError(f"{self.name}: direction {direction} has seen EOF already")
        return &self.dirs[direction]

    cdef int fail(self, exc_type, str why) except -1:
        self.broken = True
        raise exc_type(f"{self.name}: {why}")

    def feed(self, int direction, data, chunks=None, size_t out_cap=65536,
             size_t in_cap=65536):
        """Pushes data into direction as arrivals of the given sizes (cycled; default:
        in_cap) and returns what the function output meanwhile. Bytes it has not consumed
        stay in the input buffer for the next feed or finish."""
        cdef Direction *x = self.direction(direction)
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef size_t at = 0, end, take, k = 0, total = view.shape[0]
        if out_cap < 1 or in_cap < 1:
            raise ValueError("out_cap and in_cap are at least 1")
        if x.pending > in_cap:
            raise ValueError(f"{x.pending} bytes are held, more than in_cap {in_cap}")
        sizes = list(chunks) if chunks else [in_cap]
        if min(sizes) < 1:
            raise ValueError("chunk sizes are at least 1")
        if in_cap != x.cap:
            if x.pending:
                memmove(x.buf, x.buf + x.start, x.pending)
            x.start = 0
            resize(&x.buf, &x.cap, in_cap)
        if self.desc.flags & PIPES_VF_INPLACE:
            return self.feed_inplace(direction, view, sizes)
        resize(&self.obuf, &self.ocap, out_cap)
        output = bytearray()
        while at < total:
            end = min(total, at + <size_t>sizes[k % len(sizes)])
            k += 1
            while at < end:   # one arrival, read into the room the buffer has
                if x.pending == 0:
                    x.start = 0
                elif x.start + x.pending == x.cap:
                    memmove(x.buf, x.buf + x.start, x.pending)
                    x.start = 0
                take = min(end - at, x.cap - x.start - x.pending)
                memcpy(x.buf + x.start + x.pending, &view[at], take)
                x.pending += take
                x.starved = False
                self.pump(direction, x, out_cap, False, output)
                at += take
        return bytes(output)

    cdef bytes feed_inplace(self, int direction, const uint8_t[::1] view, list sizes):
        """The INPLACE path: the relay transforms each read (at most the buffer size) where
        it landed. Here the reads land in the result directly (one copy, no buffer)."""
        cdef size_t at = 0, end, take, k = 0, total = view.shape[0]
        cdef size_t cap = self.dirs[direction].cap
        result = PyBytes_FromStringAndSize(NULL, total)   # ours until returned
        cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(result)
        if total:
            memcpy(out, &view[0], total)
        while at < total:
            end = min(total, at + <size_t>sizes[k % len(sizes)])
            k += 1
            while at < end:
                take = min(end - at, cap)
                self.run_inplace(direction, out + at, take)
                at += take
        return result

    def finish(self, int direction, size_t out_cap=65536):
        """The source's FIN: runs the PIPES_VF_EOF calls and returns their output (nothing
        for an INPLACE function, which is never called at EOF)."""
        cdef Direction *x = self.direction(direction)
        if out_cap < 1:
            raise ValueError("out_cap is at least 1")
        output = bytearray()
        if not self.desc.flags & PIPES_VF_INPLACE:
            resize(&self.obuf, &self.ocap, out_cap)
            self.pump(direction, x, out_cap, True, output)
        x.finished = True
        return bytes(output)

    cdef int run_inplace(self, int direction, uint8_t *data, size_t n) except -1:
        cdef size_t consumed = n
        cdef ssize_t r = self.desc.process(self.ctx, direction, data, &consumed, data, n, 0)
        if r == PIPES_VF_RESET:
            self.fail(FlowReset, "process reset the flow")
        if r == PIPES_VF_ERROR:
            self.fail(FlowError, "process failed (PIPES_VF_ERROR)")
        if r != <ssize_t>n or consumed != n:
            self.fail(FlowError, f"INPLACE process returned {r} and consumed {consumed} "
                                 f"of {n} bytes")
        return 0

    cdef int pump(self, int direction, Direction *x, size_t out_cap, bint eof,
                  bytearray output) except -1:
        """Calls process while the relay would (see the class docstring)."""
        cdef size_t consumed
        cdef ssize_t r
        cdef bint more = False
        while eof or more or (x.pending and not x.starved):
            consumed = x.pending
            r = self.desc.process(self.ctx, direction, x.buf + x.start, &consumed, self.obuf,
                                  out_cap, PIPES_VF_EOF if eof else 0)
            if r == PIPES_VF_RESET:
                self.fail(FlowReset, "process reset the flow")
            if r == PIPES_VF_ERROR:
                self.fail(FlowError, "process failed (PIPES_VF_ERROR)")
            if r < 0 or <size_t>r > out_cap or consumed > x.pending:
                self.fail(FlowError, f"process returned {r} (out_cap {out_cap}) and consumed "
                                     f"{consumed} of {x.pending} bytes")
            x.start += consumed
            x.pending -= consumed
            append(output, self.obuf, <size_t>r)
            more = <size_t>r == out_cap
            if r > 0 or consumed > 0:
                continue
            if eof:
                if x.pending:
                    self.fail(FlowError, f"at EOF process will not take the last "
                                         f"{x.pending} bytes")
                return 0
            if x.pending == x.cap:
                self.fail(FlowError, f"process stalls on a full input buffer ({x.cap} bytes)")
            x.starved = True
        return 0

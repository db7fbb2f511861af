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

`FunctionDriver` runs one flow of a descriptor through the relay's own flow core
(cext/flowcore.h), without sockets: unit tests and microbenchmarks see the calls the relay
makes.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlclose, dlerror, dlopen, dlsym

from srv6pipes_vf cimport (PIPES_VF_ABI, PIPES_VF_EOF, PIPES_VF_ERROR, PIPES_VF_INPLACE,
                           PIPES_VF_RESET, pipes_flow_info, pipes_func_desc)
from flowcore cimport (fc_flow, fc_dir, fc_op, fc_step, fc_init, fc_set_buffers, fc_begin,
                       fc_next, fc_done, fc_why_text, FC_INPLACE, FC_STREAM, FC_END, FC_RECV,
                       FC_SEND, FC_PROCESS, FC_SHUTDOWN, FC_AGAIN, FC_FAILED, FC_VF_RESET,
                       FC_WHY_EOF_LEFT, FC_WHY_STALLED)

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

cdef int append(bytearray output, const uint8_t *data, size_t n) except -1:
    cdef Py_ssize_t size = len(output)
    PyByteArray_Resize(output, size + <Py_ssize_t>n)
    memcpy(PyByteArray_AS_STRING(output) + size, data, n)
    return 0


cdef bytes address16(value):
    """An IPv6 address given as 16 bytes, text or IPv6Address: its 16 bytes."""
    return ipaddress.IPv6Address(value).packed


cdef class FunctionDriver:
    """One flow of a C function, driven by the relay's own flow core (cext/flowcore.h)
    without sockets: what it calls when, with which room, is what the relay does.

    FunctionDriver(address, params, client=..., client_port=0, server=..., server_port=0,
    function_address=...) spawns the descriptor at `address` (from BUILTIN_FUNCTIONS or a
    CModule's functions; its module must stay loaded until close()). Addresses are 16 bytes
    (default: all zero), text or IPv6Address. A NULL context raises FlowReset.

    Per direction: the source delivers each arrival (feed's chunks) as the socket would,
    read into the room the core gives (in_cap bytes of input buffer); the destination
    always takes everything at once. So: input the function has not consumed stays in the
    buffer; the function gets out_cap bytes of output room, is called again while its
    output fills it, waits ("starved") after a call that takes and gives nothing; INPLACE
    functions transform each read where it lies and are never called at EOF; finish() is
    the source's FIN: PIPES_VF_EOF calls until the flush is complete. PIPES_VF_RESET raises
    FlowReset, PIPES_VF_ERROR or a broken contract (the core's reason in the message)
    FlowError; either way only close() is left to do.
    """

    cdef const pipes_func_desc *desc
    cdef void *ctx
    cdef bint live          # spawned and not despawned yet
    cdef bint broken        # reset or failed
    cdef bint finished[2]   # EOF processed: the FIN would be forwarded
    cdef fc_flow core
    cdef uint8_t *bufs[2]   # each direction's input buffer (the core's buf)
    cdef uint8_t *obufs[2]  # and output buffer (stream path)
    cdef readonly str name
    # the source of the direction being pumped
    cdef const uint8_t *src
    cdef size_t src_len
    cdef bint src_eof

    def __cinit__(self, uintptr_t address, uint32_t params, client=b"\0" * 16,
                  int client_port=0, server=b"\0" * 16, int server_port=0,
                  function_address=b"\0" * 16):
        cdef pipes_flow_info flow
        cdef bytes client16 = address16(client)
        cdef bytes server16 = address16(server)
        cdef bytes function16 = address16(function_address)
        cdef int d
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
        self.desc = <const pipes_func_desc *>address
        self.name = self.desc.name.decode("ascii", "replace")
        fc_init(&self.core, FC_INPLACE if self.desc.flags & PIPES_VF_INPLACE else FC_STREAM,
                False)
        # Buffers first: process always gets real pointers, even for empty input.
        for d in range(2):
            self.resize(d, 65536, 65536)
        self.ctx = self.desc.spawn(params, &flow)
        if self.ctx == NULL:
            raise FlowReset(f"{self.name}: spawn refused the flow")
        self.live = True

    def __dealloc__(self):
        self.despawn()
        free(self.bufs[0])
        free(self.bufs[1])
        free(self.obufs[0])
        free(self.obufs[1])

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

    cdef int resize(self, int d, size_t in_cap, size_t out_cap) except -1:
        """Gives direction d buffers of in_cap and out_cap bytes, keeping held input."""
        cdef fc_dir *x = &self.core.dir[d]
        cdef uint8_t *grown
        if x.pending > in_cap:
            raise ValueError(f"{x.pending} bytes are held, more than in_cap {in_cap}")
        if in_cap != x.cap:
            if x.pending and x.start:
                memmove(self.bufs[d], self.bufs[d] + x.start, x.pending)
            x.start = 0
            grown = <uint8_t *>realloc(self.bufs[d], in_cap)
            if grown == NULL:
                raise MemoryError()
            self.bufs[d] = grown
        if out_cap != x.ocap and self.core.mode == FC_STREAM:
            grown = <uint8_t *>realloc(self.obufs[d], out_cap)
            if grown == NULL:
                raise MemoryError()
            self.obufs[d] = grown
        fc_set_buffers(&self.core, d, self.bufs[d], in_cap, self.obufs[d], out_cap)
        return 0

    cdef int check(self, int direction) except -1:
        if direction != 0 and direction != 1:
            raise ValueError(f"direction is 0 (up) or 1 (down), not {direction}")
        if not self.live or self.broken:
            raise FlowError(f"{self.name}: the flow is closed or was reset")
        if self.finished[direction]:
            raise ValueError(f"{self.name}: direction {direction} has seen EOF already")
        return 0

    def feed(self, int direction, data, chunks=None, size_t out_cap=65536,
             size_t in_cap=65536):
        """Pushes data into direction as arrivals of the given sizes (cycled; default:
        in_cap) and returns what the function output meanwhile. Bytes it has not consumed
        stay in the input buffer for the next feed or finish."""
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef size_t at = 0, end, k = 0, total = view.shape[0]
        self.check(direction)
        if out_cap < 1 or in_cap < 1:
            raise ValueError("out_cap and in_cap are at least 1")
        sizes = list(chunks) if chunks else [in_cap]
        if min(sizes) < 1:
            raise ValueError("chunk sizes are at least 1")
        self.resize(direction, in_cap, out_cap)
        output = bytearray()
        while at < total:
            end = min(total, at + <size_t>sizes[k % len(sizes)])
            k += 1
            self.src = &view[at]
            self.src_len = end - at
            self.src_eof = False
            self.pump(direction, output)
            at = end
        return bytes(output)

    def finish(self, int direction, size_t out_cap=65536):
        """The source's FIN: runs the PIPES_VF_EOF calls and returns their output (nothing
        for an INPLACE function, which is never called at EOF)."""
        self.check(direction)
        if out_cap < 1:
            raise ValueError("out_cap is at least 1")
        self.resize(direction, self.core.dir[direction].cap, out_cap)
        output = bytearray()
        self.src_len = 0
        self.src_eof = True
        self.pump(direction, output)
        self.finished[direction] = True
        return bytes(output)

    cdef int pump(self, int d, bytearray output) except -1:
        """Steps direction d until nothing progresses: the arrival is read, the function
        called and its output taken as the core decides."""
        cdef fc_step s
        cdef fc_op op
        cdef ssize_t r
        cdef size_t n
        cdef int reason
        while True:
            # A new arrival (or the FIN) makes the source readable; the destination always
            # takes everything.
            self.core.rd[d] = True
            self.core.wr[1 - d] = True
            fc_begin(&s)
            while fc_next(&self.core, d, &s, &op) != FC_END:
                if op.kind == FC_RECV:
                    if self.src_len:
                        n = min(op.len, self.src_len)
                        memcpy(op.buf, self.src, n)
                        self.src += n
                        self.src_len -= n
                        r = <ssize_t>n
                    else:
                        r = 0 if self.src_eof else FC_AGAIN
                elif op.kind == FC_SEND:
                    append(output, op.buf, op.len)
                    r = <ssize_t>op.len
                elif op.kind == FC_PROCESS:
                    r = self.desc.process(self.ctx, d, op.buf, &op.len, op.out, op.out_cap,
                                          op.flags & PIPES_VF_EOF)
                elif op.kind == FC_SHUTDOWN:
                    r = 0
                else:
                    r = FC_FAILED   # no pipes here: identity is not a function
                reason = fc_done(&self.core, d, &s, &op, r)
                if reason == FC_VF_RESET:
                    self.broken = True
                    raise FlowReset(f"{self.name}: process reset the flow")
                if reason < 0:
                    self.broken = True
                    text = fc_why_text(self.core.why)
                    why = "reset" if text == NULL else text.decode()
                    if self.core.why == FC_WHY_EOF_LEFT:
                        why = f"{why}: the last {self.core.dir[d].pending} bytes"
                    elif self.core.why == FC_WHY_STALLED:
                        why = f"{why} ({self.core.dir[d].cap} bytes)"
                    raise FlowError(f"{self.name}: {why} (process returned {r}, consumed "
                                    f"{op.len}, out_cap {op.out_cap})")
            if not s.progress:
                return 0

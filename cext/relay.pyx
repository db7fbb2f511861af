# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The per-worker relay loop: moves the bytes of every flow between its two sockets.

A *flow* is the pair of connections through the proxy: side 0 is the client connection
(accepted by the worker), side 1 the server connection (connected onward). Direction 0 ("up")
moves client -> server bytes, direction 1 ("down") server -> client bytes.

The worker (Python) accepts and connects, then hands both descriptors to `RelayLoop.add_flow`;
from then on the loop owns them and closes each exactly once. `RelayLoop.poll` runs one
`epoll_wait` and handles every flow event in C without the GIL; it returns LISTENER_READY |
WATCHED_READY for what Python must serve (0 for nothing).

This file is the shell around the flow core (cext/flowcore.h, whose comment is the contract):
every decision (when to read and how much, when the function is called, when to flush, when
a direction moves to splice, when the FIN may be sent, when a flow is reset) is the core's.
The shell maps epoll events to the core's inputs, performs the operations the core asks for
(recv, send, splice, the function's process, shutdown, a pipe) and reports their outcomes,
and keeps what is not a decision: descriptors, counters, timeouts, the pipe pool, fairness.

Flow life cycle:

    add_flow --> connecting --server writable, SO_ERROR 0--> open --both FINs forwarded--> closed
                   | SO_ERROR / error on the server: connect_failed (RST the client)
                   | error on the client: reset
    open: every event pumps the flow: rounds of one step per direction until nothing
          progresses. Any failed operation, or the function's reset or broken contract:
          RST both sides (SO_LINGER {1, 0} + close), flows_reset.

A pump makes at most PUMP_ROUNDS rounds; a flow that still has work is put on a ready list
which the next poll serves (with a zero epoll timeout), so one fast flow cannot starve the
others. Timeouts (set_timeouts) are checked about once a second, and in the same walk the
server socket of a flow open for a second gets its keepalive (set_keepalive).

Buffers: per direction one buffer (`buffer_size` bytes for functions, IDENTITY_BUFFER = 16 KiB
for identity), and on the stream path an output buffer of the same size; for bulk identity
directions one pipe. A full buffer or pipe stops reading its source, so a slow reader is
throttled by TCP flow control instead of growing memory. Identity starts on the buffer path
and the core moves a direction that proves to be a bulk stream to splice (HAProxy's
splice-auto: for the few hundred bytes of a request a pipe costs more than the copy).
Empty pipes of ended flows are pooled (PIPE_POOL) instead of closed; the core says which
pipes may be (fc_pipe_reusable: an empty one). If no pipe can be had (EMFILE...) the flow
stays on the buffer path (splice_fallbacks, once per flow).

Functions (cext/srv6pipes_vf.h) are bound once per flow in add_flow(): a C descriptor
(built-in, or from a loaded C module) or a Python function (vfapi.FlowAdapter behind a C
trampoline that takes the GIL). A function's PIPES_VF_RESET resets the flow (vf_resets),
PIPES_VF_ERROR or a broken contract too (vf_errors); both also count as flows_reset.
The process must ignore SIGPIPE (Python does): splice() to a reset socket cannot pass
MSG_NOSIGNAL.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, memcpy, memmove
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport close
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport uintptr_t

import logging

from .ratelimit import RateLimitedLogger
from .vfapi import FlowAdapter, FlowInfo, ResetFlow


from csystem cimport (epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN, EPOLLOUT,
                      EPOLLRDHUP, EPOLLPRI, EPOLLERR, EPOLLHUP, EPOLLET, EPOLL_CTL_ADD,
                      EPOLL_CLOEXEC, splice, fcntl, F_SETPIPE_SZ, F_GETPIPE_SZ, SPLICE_F_MOVE,
                      SPLICE_F_NONBLOCK, SPLICE_F_MORE, O_NONBLOCK, O_CLOEXEC, timespec,
                      clock_gettime, CLOCK_MONOTONIC_COARSE, pipe2, write, ioctl, SIOCATMARK,
                      linger, recv, send, shutdown, setsockopt, getsockopt, socklen_t,
                      SOL_SOCKET, SO_LINGER, SO_ERROR, SHUT_WR, MSG_NOSIGNAL, MSG_DONTWAIT,
                      MSG_MORE, SO_KEEPALIVE, IPPROTO_TCP, TCP_KEEPIDLE, TCP_KEEPINTVL,
                      TCP_KEEPCNT)

from srv6pipes_vf cimport (pipes_flow_info, pipes_func_desc, vf_process_fn, PIPES_VF_EOF,
                           PIPES_VF_RESET, PIPES_VF_ERROR, PIPES_VF_INPLACE)
from flowcore cimport (FC_BOUNCE_SIZE, fc_flow, fc_op, fc_step, fc_init, fc_set_buffers, fc_wants_so_error,
                       fc_event, fc_end, fc_pipe_reusable, fc_begin, fc_next, fc_done, fc_round,
                       FC_IDENTITY, FC_INPLACE, FC_STREAM, FC_PATH_PIPE, FC_FREE, FC_CONNECTING,
                       FC_OPEN, FC_CLOSED, FC_RESET, FC_CONNECT_FAILED, FC_END, FC_RECV, FC_SEND,
                       FC_PROCESS, FC_GET_PIPE, FC_SPLICE_OUT, FC_SPLICE_IN, FC_BOUNCE,
                       FC_SHUTDOWN, FC_MORE, FC_CHECK_URGENT, FC_AGAIN, FC_INTR, FC_FAILED,
                       FC_URGENT, FC_VF_RESET, FC_VF_ERROR, FC_IDLE, FC_CLOSE, FC_EV_IN,
                       FC_EV_OUT, FC_EV_WRITABLE, FC_EV_HUP, FC_EV_RDHUP, FC_EV_ERR,
                       FC_EV_NOTHING, FC_EV_PUMP, FC_EV_CONNECT_FAILED, FC_EV_RESET)


log = logging.getLogger("srv6pipes.vf")
rlog = RateLimitedLogger(log)

# The per-function-slot counters, in order; the slot's block starts at slot * len(...).
# Every flow that add_flow() accepted ends in exactly one of closed / reset / connect_failed;
# flows_rejected counts add_flow() calls refused (table full, out of memory): not started.
FUNCTION_COUNTERS = (
    "flows_started",
    "flows_active",
    "flows_closed",
    "flows_reset",
    "connect_failed",
    "bytes_up",
    "bytes_down",
    "splice_fallbacks",
    "flows_rejected",
    "vf_resets",          # the function asked for a reset (e.g. a DPI block)
    "vf_errors",          # the function failed: exception, PIPES_VF_ERROR, broken contract
    "splice_switches",    # identity directions moved from the buffer path to splice (bulk)
    "timeouts_connect",   # the server did not answer within the connect timeout (connect_failed)
    "timeouts_client",    # the client side idle too long (idle or, after its FIN, client-fin)
    "timeouts_server",    # the server side idle too long (idle or, after its FIN, server-fin)
)

cdef enum:
    C_STARTED = 0
    C_ACTIVE
    C_CLOSED
    C_RESET
    C_CONNECT_FAILED
    C_BYTES_UP
    C_BYTES_DOWN
    C_SPLICE_FALLBACKS
    C_REJECTED
    C_VF_RESETS
    C_VF_ERRORS
    C_SPLICE_SWITCHES
    C_TIMEOUTS_CONNECT
    C_TIMEOUTS_CLIENT
    C_TIMEOUTS_SERVER
    N_COUNTERS

assert N_COUNTERS == len(FUNCTION_COUNTERS)

cdef enum:
    PUMP_ROUNDS = 32        # rounds per pump before the flow yields to the ready list
    PIPE_POOL = 64          # empty pipes kept for reuse (2 descriptors each)
    IDENTITY_BUFFER = 16384 # identity's buffer before splice (HAProxy's bufsize): small
                            # exchanges fit, and 10,000 idle flows take 320 MB, not 1.3 GB
    MAX_EVENTS = 256
    KEEPALIVE_AFTER_MS = 1000   # a flow this old gets its server socket's keepalive armed

# epoll_event.data.u64: generation << 32 | flow index << 1 | side. The generation makes a
# stale event (a descriptor shared with another process outliving our close) harmless.
cdef uint64_t LISTENER_TOKEN = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t WATCHED_TOKEN = 0xFFFFFFFFFFFFFFFEULL

# poll() results, or-ed
LISTENER_READY = 1
WATCHED_READY = 2

cdef int CAN_READ = EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLERR | EPOLLHUP
# After these a short read does not prove the receive queue empty (a FIN or an error must
# still be read; TCP urgent data makes recv stop early at the urgent mark).
cdef int NO_SHORTCUT = EPOLLRDHUP | EPOLLPRI | EPOLLERR | EPOLLHUP
cdef int CAN_WRITE = EPOLLOUT | EPOLLERR | EPOLLHUP


cdef struct PooledPipe:
    int pipe_r
    int pipe_w
    size_t pipe_cap


cdef struct Flow:
    fc_flow core            # every decision: state, readiness, buffers (cext/flowcore.h)
    int fd[2]               # 0 = client, 1 = server
    int pipe_r[2]           # per direction, once it moved to splice; -1 before
    int pipe_w[2]
    uint32_t gen
    uint64_t started_ms     # add_flow time: the connect timeout counts from here
    uint64_t last_ms[2]     # last byte read from or written to each side (idle timeouts)
    uint64_t *ctr           # this flow's function-slot counters
    const pipes_func_desc *fn   # NULL: identity
    vf_process_fn process   # fn.process, or the Python trampoline
    void *ctx               # what spawn returned (a FlowAdapter for Python functions)
    bint py                 # ctx is a Python object we hold a reference to
    int next_free
    int ready_prev          # ready list links, valid while queued
    int ready_next
    bint queued
    bint keepalive_armed    # the server socket's keepalive is set (set_keepalive)


cdef ssize_t py_process(void *ctx, int direction, const uint8_t *inp, size_t *in_len,
                        uint8_t *out, size_t out_cap, int flags) noexcept nogil:
    """The C process of every Python function: runs its FlowAdapter.step with the GIL."""
    with gil:
        return _py_step(<object>ctx, direction, inp, in_len, out, out_cap, flags)


cdef ssize_t _py_step(object adapter, int direction, const uint8_t *inp, size_t *in_len,
                      uint8_t *out, size_t out_cap, int flags) noexcept:
    cdef Py_ssize_t n
    cdef bytes output
    try:
        consumed, output = adapter.step(direction, (<const char *>inp)[:in_len[0]],
                                        bool(flags & PIPES_VF_EOF), out_cap)
    except ResetFlow as exc:
        rlog.info("vf-reset", "function %s reset a flow: %s", adapter.function.name, exc)
        return PIPES_VF_RESET
    except Exception as exc:  # noqa: BLE001 - a broken function only costs its own flow
        rlog.warning("vf-error", "function %s failed: %r", adapter.function.name, exc)
        return PIPES_VF_ERROR
    n = len(output)
    if n:
        memcpy(out, <const char *>output, n)
    in_len[0] = consumed
    return n


def valid_flow(flow):
    """add_flow's flow tuple: (client, client_port, server, server_port, function_address)."""
    return (isinstance(flow, tuple) and len(flow) == 5
            and all(type(flow[i]) is bytes and len(flow[i]) == 16 for i in (0, 2, 4))
            and all(type(flow[i]) is int and 0 <= flow[i] < 65536 for i in (1, 3)))


cdef inline bint would_block(int err) noexcept nogil:
    return err == EAGAIN    # == EWOULDBLOCK on Linux


cdef inline ssize_t errno_outcome() noexcept nogil:
    """A failed system call's errno as the flow core's outcome."""
    if would_block(errno):
        return FC_AGAIN
    if errno == EINTR:
        return FC_INTR
    return FC_FAILED


cdef inline void close_reset(int fd) noexcept nogil:
    """Close fd so that the peer gets an RST, not a FIN."""
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    close(fd)


cdef inline bint at_urgent_mark(int fd) noexcept nogil:
    cdef int mark = 0
    return ioctl(fd, SIOCATMARK, &mark) == 0 and mark != 0


cdef inline int socket_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef inline uint64_t monotonic_ms() noexcept nogil:
    """The coarse monotonic clock (a few ms of resolution, no system call on x86 vDSO):
    read once per poll for the timeouts, never per chunk."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000


cdef inline void set_int(int fd, int level, int name, int value) noexcept nogil:
    setsockopt(fd, level, name, &value, sizeof(value))


cdef inline void arm_keepalive(int fd, int idle, int interval, int count) noexcept nogil:
    """Keepalive on an established socket (set_keepalive). TCP_KEEPIDLE last: with
    SO_KEEPALIVE already on, setting it re-arms the timer from the last segment received.
    Best effort: a socket that fails here has failed, and the flow finds out on its own."""
    set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1)
    set_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, interval)
    set_int(fd, IPPROTO_TCP, TCP_KEEPCNT, count)
    set_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, idle)


cdef inline void linger_off(int fd) noexcept nogil:
    """Undo the flow's SO_LINGER {1, 0} before a graceful close (see _finish)."""
    cdef linger lg
    lg.l_onoff = 0
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef class RelayLoop:
    """One worker's epoll relay loop. Not thread-safe: call every method from one thread.

    RelayLoop(listen_fd, counters, nslots, max_flows=65536, buffer_size=65536, pipe_size=1<<20)

    listen_fd is registered level-triggered (EPOLLIN) and never closed by the loop; closing it
    is enough to unregister it. counters is a writable contiguous buffer (memoryview cast to
    'Q', bytearray, mmap slice...) of at least nslots * len(FUNCTION_COUNTERS) native uint64,
    8-byte aligned; it stays exported (locked) until close().
    """
    cdef int epfd
    cdef int listen_fd
    cdef Flow *flows
    cdef int max_flows
    cdef int free_head
    cdef int high_water      # entries [high_water, max_flows) were never used
    cdef int nactive
    cdef int ready_head
    cdef int ready_tail
    cdef int nready
    cdef uint64_t *counters
    cdef int nslots
    cdef Py_buffer view
    cdef bint have_view
    cdef size_t buffer_size
    cdef size_t pipe_size
    cdef epoll_event *events
    cdef PooledPipe pool[PIPE_POOL]
    cdef int pool_len
    cdef uint64_t now_ms            # CLOCK_MONOTONIC_COARSE, read once per poll
    cdef uint64_t next_expiry_ms    # when _expire next looks at every flow
    cdef uint64_t connect_timeout_ms    # 0: none (the kernel's SYN retries decide)
    cdef uint64_t idle_timeout_ms[2]    # per side: client, server; 0: none
    cdef uint64_t fin_timeout_ms[2]     # per side, once that side has sent its FIN
    cdef size_t last_pipe_cap           # _get_pipe's result
    cdef int keepalive_idle             # the server sockets' keepalive (set_keepalive); 0: off
    cdef int keepalive_interval
    cdef int keepalive_count

    def __cinit__(self):
        self.epfd = -1
        self.flows = NULL
        self.events = NULL
        self.have_view = False
        self.ready_head = -1
        self.ready_tail = -1

    def __init__(self, int listen_fd, object counters, int nslots, int max_flows=65536,
                 int buffer_size=65536, int pipe_size=1 << 20):
        cdef epoll_event ev
        if nslots <= 0:
            raise ValueError("nslots must be positive")
        if max_flows <= 0 or max_flows > (1 << 30):
            raise ValueError("max_flows out of range")
        if buffer_size < 64:
            raise ValueError("buffer_size must be at least 64 bytes")
        if pipe_size <= 0:
            raise ValueError("pipe_size must be positive")
        if self.epfd >= 0:
            raise RuntimeError("RelayLoop already initialised")
        PyObject_GetBuffer(counters, &self.view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        self.have_view = True
        if self.view.len < <Py_ssize_t>nslots * N_COUNTERS * 8:
            self._release_view()
            raise ValueError(f"counters buffer too small: {nslots} slots * {N_COUNTERS} "
                             f"counters * 8 bytes needed")
        if (<size_t>self.view.buf) % 8:
            self._release_view()
            raise ValueError("counters buffer is not 8-byte aligned")
        self.counters = <uint64_t *>self.view.buf
        self.nslots = nslots
        self.max_flows = max_flows
        self.buffer_size = buffer_size
        self.pipe_size = pipe_size
        self.listen_fd = listen_fd
        self.flows = <Flow *>calloc(max_flows, sizeof(Flow))
        self.events = <epoll_event *>calloc(MAX_EVENTS, sizeof(epoll_event))
        if self.flows == NULL or self.events == NULL:
            self.close()
            raise MemoryError()
        # calloc'd pages are only touched when a flow first uses them (high_water), so a
        # 65536-flow table costs nothing until the flows exist.
        self.free_head = -1
        self.high_water = 0
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            err = errno
            self.close()
            raise OSError(err, "epoll_create1 failed")
        memset(&ev, 0, sizeof(ev))
        ev.events = EPOLLIN
        ev.data.u64 = LISTENER_TOKEN
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, listen_fd, &ev) < 0:
            err = errno
            self.close()
            raise OSError(err, "cannot register the listening socket")

    def __dealloc__(self):
        self._close()

    cdef void _release_view(self):
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False
        self.counters = NULL

    @property
    def active_flows(self):
        """Flows added and not yet closed."""
        return self.nactive

    def watch(self, int fd):
        """Also wake poll() when fd is readable (level-triggered); poll then reports
        WATCHED_READY. One watched descriptor at most (the worker's control channel)."""
        cdef epoll_event ev
        memset(&ev, 0, sizeof(ev))
        ev.events = EPOLLIN
        ev.data.u64 = WATCHED_TOKEN
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "cannot watch the descriptor")

    def set_timeouts(self, double connect=0, double client=0, double server=0,
                     double client_fin=0, double server_fin=0):
        """Timeouts in seconds (0: none), HAProxy's names: a connect not completed within
        `connect` fails the flow (timeouts_connect, connect_failed); a side with no byte
        read from or written to it for `client` / `server` seconds resets the flow
        (timeouts_client / timeouts_server, flows_reset); once that side has sent its FIN,
        `client_fin` / `server_fin` apply instead. Checked about once a second."""
        for value in (connect, client, server, client_fin, server_fin):
            if value < 0:
                raise ValueError("timeouts are >= 0 seconds")
        self.connect_timeout_ms = <uint64_t>(connect * 1000)
        self.idle_timeout_ms[0] = <uint64_t>(client * 1000)
        self.idle_timeout_ms[1] = <uint64_t>(server * 1000)
        self.fin_timeout_ms[0] = <uint64_t>(client_fin * 1000)
        self.fin_timeout_ms[1] = <uint64_t>(server_fin * 1000)

    def set_keepalive(self, int idle, int interval, int count):
        """TCP keepalive of every flow's server socket (the client socket inherits the
        listener's): first probe after `idle` seconds without a segment from the server,
        then every `interval`, reset after `count` unanswered (idle 0: off).

        Armed by the once-a-second walk (_expire) on open flows at least KEEPALIVE_AFTER_MS
        old, not when the socket is made: a short connection never pays the four setsockopt
        calls. Dead-server detection is unchanged: TCP_KEEPIDLE is set last, and on a socket
        with SO_KEEPALIVE the kernel then counts the idle time from the last segment
        received (tcp_sock_set_keepidle_locked), so the first probe is as early as with
        keepalive set at connect (only an idle below the arming age, 1-2 s, is a little
        late). Before the connect completes keepalive does nothing anyway (SYN_SENT)."""
        if idle < 0 or interval <= 0 or count <= 0:
            raise ValueError("keepalive: idle >= 0, interval > 0, count > 0")
        self.keepalive_idle = idle
        self.keepalive_interval = interval
        self.keepalive_count = count

    # -- adding a flow -------------------------------------------------------------------
    def add_flow(self, int client_fd, int server_fd, int slot=0, uintptr_t function=0,
                 object pyfunction=None, unsigned int params=0, tuple flow=None,
                 bint connecting=True):
        """Hand a flow to the loop, which owns both descriptors from now on.

        Both are nonblocking TCP sockets; with connecting=True the server socket has a
        nonblocking connect() in progress. The function is bound here, once:
          function    address of a C `pipes_func_desc` (srv6pipes._vf), or 0;
          pyfunction  a vfapi.Function (Python), or None; neither = identity (splice);
          params      the address's parameter bits, given to spawn;
          flow        (client, client_port, server, server_port, function_address), the
                      addresses as 16 packed bytes, for spawn (needed with a function).
        A spawn that fails or refuses resets the flow (vf_errors / vf_resets). If the table is
        full or memory runs out the client is reset, both are closed and flows_rejected is
        counted (nothing raised). A bad slot or flow is a programming error: both are reset
        and ValueError is raised.
        """
        cdef Flow *f
        cdef int idx, d
        cdef uint64_t *ctr
        cdef const pipes_func_desc *fn = <const pipes_func_desc *>function
        cdef pipes_flow_info info
        cdef epoll_event ev
        if self.epfd < 0:
            close_reset(client_fd)
            close_reset(server_fd)
            raise ValueError("RelayLoop is closed")
        if slot < 0 or slot >= self.nslots or (fn != NULL and pyfunction is not None) or (
                (fn != NULL or pyfunction is not None) and not valid_flow(flow)):
            close_reset(client_fd)
            close_reset(server_fd)
            raise ValueError(f"bad slot {slot} (nslots={self.nslots}), function or flow")
        ctr = self.counters + <size_t>slot * N_COUNTERS
        if self.free_head >= 0:
            idx = self.free_head
            self.free_head = self.flows[idx].next_free
        elif self.high_water < self.max_flows:
            idx = self.high_water
            self.high_water += 1
        else:
            close_reset(client_fd)
            close_reset(server_fd)
            ctr[C_REJECTED] += 1
            return
        f = &self.flows[idx]
        f.fd[0] = client_fd
        f.fd[1] = server_fd
        f.gen += 1
        f.ctr = ctr
        f.queued = False
        f.keepalive_armed = False
        f.fn = NULL
        f.process = NULL
        f.ctx = NULL
        f.py = False
        for d in range(2):
            f.pipe_r[d] = -1
            f.pipe_w[d] = -1
        if fn == NULL and pyfunction is None:
            # Identity: pipes come when a direction proves to be bulk.
            fc_init(&f.core, FC_IDENTITY, connecting)
        elif fn != NULL:
            f.fn = fn
            f.process = fn.process
            fc_init(&f.core, FC_INPLACE if fn.flags & PIPES_VF_INPLACE else FC_STREAM,
                    connecting)
        else:
            f.process = py_process
            fc_init(&f.core, FC_STREAM, connecting)
        self.now_ms = monotonic_ms()
        f.started_ms = self.now_ms
        f.last_ms[0] = self.now_ms
        f.last_ms[1] = self.now_ms
        self.nactive += 1
        ctr[C_STARTED] += 1
        ctr[C_ACTIVE] += 1

        if self._alloc_buffers(f) < 0:
            # Undo the start: this flow never existed.
            ctr[C_STARTED] -= 1
            ctr[C_ACTIVE] -= 1
            self.nactive -= 1
            close_reset(client_fd)
            close_reset(server_fd)
            f.fd[0] = -1
            f.fd[1] = -1
            fc_end(&f.core)
            f.next_free = self.free_head
            self.free_head = idx
            ctr[C_REJECTED] += 1
            return

        # Spawn last: from here on _finish() undoes everything, despawn included.
        if fn != NULL:
            memset(&info, 0, sizeof(info))
            memcpy(info.client, <const char *>flow[0], 16)
            memcpy(info.server, <const char *>flow[2], 16)
            memcpy(info.function_address, <const char *>flow[4], 16)
            info.client_port = flow[1]
            info.server_port = flow[3]
            info.params = params
            f.ctx = fn.spawn(params, &info)
            if f.ctx == NULL:
                ctr[C_VF_ERRORS] += 1
                self._finish(f, C_RESET)
                return
        elif pyfunction is not None:
            try:
                adapter = FlowAdapter(pyfunction, params, FlowInfo.from_wire(*flow, params))
            except ResetFlow as exc:
                rlog.info("vf-reset", "function %s refused a flow: %s", pyfunction.name, exc)
                ctr[C_VF_RESETS] += 1
                self._finish(f, C_RESET)
                return
            except Exception as exc:  # noqa: BLE001 - a broken spawn only costs its flow
                rlog.warning("vf-error", "function %s: spawn failed: %r", pyfunction.name, exc)
                ctr[C_VF_ERRORS] += 1
                self._finish(f, C_RESET)
                return
            Py_INCREF(adapter)
            f.ctx = <void *>adapter
            f.py = True

        memset(&ev, 0, sizeof(ev))
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET
        for d in range(2):
            ev.data.u64 = (<uint64_t>f.gen << 32) | (<uint64_t>idx << 1) | <uint64_t>d
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, f.fd[d], &ev) < 0:
                self._finish(f, C_RESET)
                return
        # Readiness present at registration is reported by the first epoll_wait, so the
        # flow starts pumping (or completes its connect) in the next poll().

    # -- polling ---------------------------------------------------------------------------
    def poll(self, int timeout_ms):
        """One epoll_wait (timeout_ms, -1 = forever) and every flow event handled in C,
        without the GIL. Returns LISTENER_READY | WATCHED_READY for what Python must serve
        (0 for nothing)."""
        cdef int r
        if self.epfd < 0:
            raise ValueError("RelayLoop is closed")
        with nogil:
            r = self._poll(timeout_ms)
        if r < 0:
            # EINTR: return so that Python runs its signal handlers.
            return 0
        return r

    cdef int _poll(self, int timeout) noexcept nogil:
        cdef int n, i, side, idx, count
        cdef uint64_t token
        cdef int ready = 0
        cdef Flow *f
        if self.ready_head >= 0:
            timeout = 0
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, timeout)
        if n < 0:
            return -1
        self.now_ms = monotonic_ms()
        for i in range(n):
            token = self.events[i].data.u64
            if token == LISTENER_TOKEN:
                ready |= 1
                continue
            if token == WATCHED_TOKEN:
                ready |= 2
                continue
            idx = <int>((token >> 1) & 0x7FFFFFFF)
            side = <int>(token & 1)
            if idx >= self.max_flows:
                continue
            f = &self.flows[idx]
            if f.core.state == FC_FREE or f.gen != <uint32_t>(token >> 32):
                continue
            self._handle(f, side, self.events[i].events)
        # Serve the flows that ran out of budget, each at most once per poll.
        count = self.nready
        while count > 0 and self.ready_head >= 0:
            count -= 1
            f = &self.flows[self.ready_head]
            self._unqueue(f)
            self._pump(f)
        if self.now_ms >= self.next_expiry_ms:
            self.next_expiry_ms = self.now_ms + 1000
            self._expire()
        return ready

    cdef void _expire(self) noexcept nogil:
        """Ends the flows whose connect, idle or half-closed timeout has passed, and arms
        the server socket's keepalive of open flows a second old (set_keepalive). About
        once a second: a walk over the flow table (the slots ever used)."""
        cdef int i, side
        cdef uint64_t limit
        cdef Flow *f
        for i in range(self.high_water):
            f = &self.flows[i]
            if f.core.state == FC_CONNECTING:
                if self.connect_timeout_ms and self.now_ms - f.started_ms > self.connect_timeout_ms:
                    f.ctr[C_TIMEOUTS_CONNECT] += 1
                    self._finish(f, C_CONNECT_FAILED)
            elif f.core.state == FC_OPEN:
                if (self.keepalive_idle and not f.keepalive_armed
                        and self.now_ms - f.started_ms >= KEEPALIVE_AFTER_MS):
                    f.keepalive_armed = True
                    arm_keepalive(f.fd[1], self.keepalive_idle, self.keepalive_interval,
                                  self.keepalive_count)
                for side in range(2):
                    # dir[side] reads from side: its eof is that side's FIN.
                    limit = (self.fin_timeout_ms[side] if f.core.dir[side].eof
                             else self.idle_timeout_ms[side])
                    if limit and self.now_ms - f.last_ms[side] > limit:
                        f.ctr[C_TIMEOUTS_CLIENT + side] += 1
                        self._finish(f, C_RESET)
                        break

    cdef void _handle(self, Flow *f, int side, uint32_t evs) noexcept nogil:
        """One epoll event: the core updates the side's readiness and says what follows."""
        cdef int ev = 0
        cdef int what
        if evs & CAN_READ:
            ev = FC_EV_IN
            if evs & NO_SHORTCUT:
                ev |= FC_EV_HUP
            if evs & EPOLLRDHUP:
                ev |= FC_EV_RDHUP
        if evs & CAN_WRITE:
            ev |= FC_EV_OUT
        if evs & EPOLLOUT:
            ev |= FC_EV_WRITABLE
        if evs & (EPOLLERR | EPOLLHUP):
            ev |= FC_EV_ERR
        what = fc_event(&f.core, side, ev,
                        socket_error(f.fd[side]) if fc_wants_so_error(&f.core, side) else 0)
        if what == FC_EV_CONNECT_FAILED:
            self._finish(f, C_CONNECT_FAILED)
            return
        if what == FC_EV_RESET:
            self._finish(f, C_RESET)
            return
        if what != FC_EV_PUMP or self._pump(f):
            return
        if evs & EPOLLERR:
            # A pending error the pump did not meet (e.g. an RST on a socket we no longer
            # read from nor write to right now): it must still become an RST on the other side.
            if socket_error(f.fd[side]) != 0:
                self._finish(f, C_RESET)

    # -- moving bytes: the shell around the flow core ------------------------------------------
    cdef int _pump(self, Flow *f) noexcept nogil:
        """Rounds of one step per direction until nothing progresses, the flow ends, or its
        budget (PUMP_ROUNDS) is used up. Returns 1 if the flow was closed."""
        cdef int rounds = 0, a, b, verdict
        if f.core.state != FC_OPEN:
            return 0
        while True:
            a = self._step(f, 0)
            b = self._step(f, 1) if a >= 0 else 0
            verdict = fc_round(&f.core, a, b)
            if verdict == FC_IDLE:
                return 0
            if verdict == FC_CLOSE:
                self._finish(f, C_CLOSED)
                return 1
            if verdict < 0:
                if verdict == FC_VF_RESET:
                    f.ctr[C_VF_RESETS] += 1
                elif verdict == FC_VF_ERROR:
                    f.ctr[C_VF_ERRORS] += 1
                self._finish(f, C_RESET)
                return 1
            rounds += 1
            if rounds >= PUMP_ROUNDS:
                self._enqueue(f)
                return 0

    cdef int _step(self, Flow *f, int d) noexcept nogil:
        """One step of direction d: performs the operations the core asks for, in order.
        Returns 1 on progress, 0 when blocked or finished, a reset reason below 0."""
        cdef fc_step s
        cdef fc_op op
        cdef int r
        fc_begin(&s)
        while fc_next(&f.core, d, &s, &op) != FC_END:
            r = fc_done(&f.core, d, &s, &op, self._perform(f, d, &op))
            if r < 0:
                return r
        return s.progress

    cdef ssize_t _perform(self, Flow *f, int d, fc_op *op) noexcept nogil:
        """The system call (or function call) behind one operation of direction d. Returns
        its outcome for fc_done: a byte count, 0, or FC_AGAIN / FC_INTR / FC_FAILED /
        FC_URGENT. Counts the bytes delivered and keeps the sides' last activity."""
        cdef int src = d, dst = 1 - d
        cdef ssize_t n
        cdef int err
        if op.kind == FC_RECV:
            n = recv(f.fd[src], op.buf, op.len, MSG_DONTWAIT)
            if n >= 0:
                f.last_ms[src] = self.now_ms
                return n
            return errno_outcome()
        if op.kind == FC_SEND:
            n = send(f.fd[dst], op.buf, op.len,
                     MSG_NOSIGNAL | MSG_DONTWAIT | (MSG_MORE if op.flags & FC_MORE else 0))
            if n > 0:
                f.ctr[C_BYTES_UP + d] += <uint64_t>n
                f.last_ms[dst] = self.now_ms
                return n
            return errno_outcome() if n < 0 else FC_FAILED
        if op.kind == FC_PROCESS:
            return f.process(f.ctx, d, op.buf, &op.len, op.out, op.out_cap,
                             op.flags & PIPES_VF_EOF)
        if op.kind == FC_SPLICE_OUT:
            n = splice(f.pipe_r[d], NULL, f.fd[dst], NULL, op.len, SPLICE_F_MOVE
                       | SPLICE_F_NONBLOCK | (SPLICE_F_MORE if op.flags & FC_MORE else 0))
            if n > 0:
                f.ctr[C_BYTES_UP + d] += <uint64_t>n
                f.last_ms[dst] = self.now_ms
                return n
            return errno_outcome() if n < 0 else 0
        if op.kind == FC_SPLICE_IN:
            n = splice(f.fd[src], NULL, f.pipe_w[d], NULL, op.len,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n >= 0:
                f.last_ms[src] = self.now_ms
            if n > 0:
                return n
            if n < 0:
                err = errno
                if err == EINTR:
                    return FC_INTR
                if not would_block(err):
                    return FC_FAILED
            # Nothing moved: EOF or EAGAIN, or (after a NO_SHORTCUT event) the urgent mark,
            # which splice() cannot pass: it reports EOF or EAGAIN there though bytes follow.
            if op.flags & FC_CHECK_URGENT and at_urgent_mark(f.fd[src]):
                return FC_URGENT
            return n if n == 0 else FC_AGAIN
        if op.kind == FC_BOUNCE:
            return self._bounce(f, d, op.len)
        if op.kind == FC_GET_PIPE:
            return self._to_splice(f, d)
        if op.kind == FC_SHUTDOWN:
            return 0 if shutdown(f.fd[dst], SHUT_WR) == 0 else FC_FAILED
        return FC_FAILED

    cdef ssize_t _bounce(self, Flow *f, int d, size_t size) noexcept nogil:
        """recv() up to one page from direction d's source into its (empty) pipe. Returns
        bytes moved, 0 at EOF, or FC_AGAIN / FC_INTR / FC_FAILED."""
        cdef unsigned char page[FC_BOUNCE_SIZE]
        cdef ssize_t n = recv(f.fd[d], page, min(size, sizeof(page)), MSG_DONTWAIT)
        if n < 0:
            return errno_outcome()
        # A write of at most one page into an empty pipe always completes.
        if n > 0 and write(f.pipe_w[d], page, <size_t>n) != n:
            return FC_FAILED
        return n

    # -- ready list (flows that used up their pump budget) -----------------------------------
    cdef void _enqueue(self, Flow *f) noexcept nogil:
        cdef int idx = <int>(f - self.flows)
        if f.queued:
            return
        f.queued = True
        f.ready_next = -1
        f.ready_prev = self.ready_tail
        if self.ready_tail >= 0:
            self.flows[self.ready_tail].ready_next = idx
        else:
            self.ready_head = idx
        self.ready_tail = idx
        self.nready += 1

    cdef void _unqueue(self, Flow *f) noexcept nogil:
        if not f.queued:
            return
        if f.ready_prev >= 0:
            self.flows[f.ready_prev].ready_next = f.ready_next
        else:
            self.ready_head = f.ready_next
        if f.ready_next >= 0:
            self.flows[f.ready_next].ready_prev = f.ready_prev
        else:
            self.ready_tail = f.ready_prev
        f.queued = False
        self.nready -= 1

    # -- pipes -----------------------------------------------------------------------------
    cdef int _get_pipe(self, int *pipe_r, int *pipe_w) noexcept nogil:
        """An empty pipe: a pooled one, or a new one sized pipe_size; its capacity is left
        in last_pipe_cap. -1 on failure."""
        cdef int p[2]
        cdef int r
        if self.pool_len > 0:
            self.pool_len -= 1
            pipe_r[0] = self.pool[self.pool_len].pipe_r
            pipe_w[0] = self.pool[self.pool_len].pipe_w
            self.last_pipe_cap = self.pool[self.pool_len].pipe_cap
            return 0
        if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
            return -1
        pipe_r[0] = p[0]
        pipe_w[0] = p[1]
        r = fcntl(p[1], F_SETPIPE_SZ, <int>self.pipe_size)
        if r < 0:
            r = fcntl(p[1], F_GETPIPE_SZ)
        self.last_pipe_cap = r if r > 0 else 65536
        return 0

    cdef ssize_t _to_splice(self, Flow *f, int d) noexcept nogil:
        """Gives identity direction d (its buffer empty) a pipe: returns the pipe's capacity,
        or FC_FAILED (the flow then stays on the buffer path for good)."""
        if self._get_pipe(&f.pipe_r[d], &f.pipe_w[d]) < 0:
            f.ctr[C_SPLICE_FALLBACKS] += 1
            return FC_FAILED
        f.ctr[C_SPLICE_SWITCHES] += 1
        return self.last_pipe_cap

    cdef void _close_pipes(self, Flow *f) noexcept nogil:
        """Returns each pipe the core calls reusable (empty) to the pool (HAProxy's trick:
        two pipe2 + two fcntl + four close saved per flow) and closes the others: a pipe with
        bytes left in it (reset flows) must not be reused."""
        cdef int d
        for d in range(2):
            if f.pipe_r[d] < 0:
                continue
            if fc_pipe_reusable(&f.core, d) and self.pool_len < PIPE_POOL:
                self.pool[self.pool_len].pipe_r = f.pipe_r[d]
                self.pool[self.pool_len].pipe_w = f.pipe_w[d]
                self.pool[self.pool_len].pipe_cap = f.core.dir[d].pipe_cap
                self.pool_len += 1
            else:
                close(f.pipe_r[d])
                close(f.pipe_w[d])
            f.pipe_r[d] = -1
            f.pipe_w[d] = -1

    # -- buffers and function contexts -------------------------------------------------------
    cdef int _alloc_buffers(self, Flow *f) noexcept nogil:
        """One allocation for every buffer of the flow (freed in _finish): one per direction
        (buffer_size, IDENTITY_BUFFER at most for identity), and on the stream path an
        output buffer of the same size too."""
        cdef size_t size = self.buffer_size
        cdef bint stream = f.core.mode == FC_STREAM
        cdef unsigned char *block
        if f.core.mode == FC_IDENTITY:
            size = min(size, <size_t>IDENTITY_BUFFER)
        block = <unsigned char *>malloc((4 if stream else 2) * size)
        if block == NULL:
            return -1
        fc_set_buffers(&f.core, 0, block, size, block + 2 * size if stream else NULL, size)
        fc_set_buffers(&f.core, 1, block + size, size, block + 3 * size if stream else NULL,
                       size)
        return 0

    cdef void _despawn(self, Flow *f) noexcept nogil:
        cdef void *ctx = f.ctx
        f.ctx = NULL
        if f.py:
            f.py = False
            with gil:
                adapter = <object>ctx
                try:
                    adapter.close()
                except Exception as exc:  # noqa: BLE001 - the flow is gone either way
                    rlog.warning("vf-error", "function %s: despawn failed: %r",
                                 adapter.function.name, exc)
                Py_DECREF(adapter)
        elif f.fn.despawn != NULL:
            f.fn.despawn(ctx)

    # -- closing ---------------------------------------------------------------------------

    cdef void _finish(self, Flow *f, int how) noexcept nogil:
        """Closes every descriptor of the flow exactly once and frees it.

        how: C_CLOSED (normal close), C_RESET (RST both sides), C_CONNECT_FAILED (RST the
        client; the failed server socket is just closed)."""
        cdef int idx = <int>(f - self.flows)
        cdef unsigned char *block = f.core.dir[0].buf
        if not fc_end(&f.core):
            return      # ended already: exactly once
        self._unqueue(f)
        if how == C_CLOSED:
            # Every flow's sockets carry SO_LINGER {1, 0} (the listener's, inherited, and the
            # onward socket's): if this process dies, the kernel then resets both sides
            # instead of closing them with a FIN a client would take for a complete
            # transfer. A graceful close must not discard unacknowledged data: linger off.
            # This close() also sends the last FIN, which the core leaves to it
            # (fc_dir.fin_at_close) instead of asking for a shutdown() first.
            linger_off(f.fd[0])
            linger_off(f.fd[1])
            close(f.fd[0])
            close(f.fd[1])
        else:
            close_reset(f.fd[0])
            close_reset(f.fd[1])
        f.fd[0] = -1
        f.fd[1] = -1
        self._close_pipes(f)
        free(block)
        f.core.dir[0].buf = NULL
        f.core.dir[1].buf = NULL
        if f.ctx != NULL:
            self._despawn(f)
        f.ctr[C_ACTIVE] -= 1
        f.ctr[how] += 1
        f.next_free = self.free_head
        self.free_head = idx
        self.nactive -= 1

    def shutdown(self, bint reset):
        """Closes every flow: reset=True sends RST both ways (flows_reset), reset=False
        closes both sockets normally (flows_closed). Used on worker exit or drain deadline."""
        self._finish_all(C_RESET if reset else C_CLOSED)

    cdef void _finish_all(self, int how) noexcept nogil:
        cdef int i
        if self.flows == NULL:
            return
        for i in range(self.high_water):
            if self.nactive == 0:
                break
            if self.flows[i].core.state != FC_FREE:
                self._finish(&self.flows[i], how)

    cdef void _close(self):
        self._finish_all(C_RESET)
        while self.pool_len > 0:
            self.pool_len -= 1
            close(self.pool[self.pool_len].pipe_r)
            close(self.pool[self.pool_len].pipe_w)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        free(self.flows)
        self.flows = NULL
        free(self.events)
        self.events = NULL
        self._release_view()

    def close(self):
        """Closes the epoll descriptor (not the listener) and frees the flow table and the
        counters buffer export. Flows still open are reset first, so no descriptor leaks."""
        self._close()

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay's flow core (cext/flowcore.h), driven from Python without sockets.

The relay (srv6pipes._relay) compiles the core into its loop; this binding runs the very same
C code for the tests' playbooks (tests/unit/test_flowcore.py) and the Python function harness
(tests/support/vfharness.py). A playbook plays the shell: it reports events, asks for the
next operation of a direction's step, performs it on its model of the sockets, the pipe and
the function, and reports the outcome.

    core = FlowCore(STREAM, buffer_size=64)
    core.event(0, readable=True, writable=True)
    core.begin(UP)
    while (op := core.next(UP)) is not None:
        ...                     # op.kind: RECV, SEND, PROCESS, ... see flowcore.h
        reason = core.done(UP, outcome, data=..., consumed=...)
    core.progress(UP)           # did the step do anything
    core.round(a, b)            # CLOSE, AGAIN_ROUND, IDLE or a reset reason

The core owns real buffers here (buffer_size bytes per direction, and an output buffer of
out_size bytes on the stream path): RECV copies the playbook's bytes into the range the core
chose, SEND and PROCESS expose theirs (`payload`). The pipe of the splice path stays in the
playbook's model: the core only counts its bytes.
"""
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize

from srv6pipes_vf cimport PIPES_VF_EOF, PIPES_VF_RESET, PIPES_VF_ERROR
from flowcore cimport *

from typing import NamedTuple

# Modes, operations, outcomes, results: the header's numbers under their header names.
IDENTITY, INPLACE, STREAM = FC_IDENTITY, FC_INPLACE, FC_STREAM
PATH_BUFFER, PATH_STREAM, PATH_PIPE = FC_PATH_BUFFER, FC_PATH_STREAM, FC_PATH_PIPE
FREE, CONNECTING, OPEN = FC_FREE, FC_CONNECTING, FC_OPEN
RECV, SEND, PROCESS, GET_PIPE = FC_RECV, FC_SEND, FC_PROCESS, FC_GET_PIPE
SPLICE_OUT, SPLICE_IN, BOUNCE, SHUTDOWN = FC_SPLICE_OUT, FC_SPLICE_IN, FC_BOUNCE, FC_SHUTDOWN
AGAIN, INTR, FAILED, URGENT = FC_AGAIN, FC_INTR, FC_FAILED, FC_URGENT
SOCKET_ERROR, VF_RESET, VF_ERROR = FC_SOCKET_ERROR, FC_VF_RESET, FC_VF_ERROR
IDLE, AGAIN_ROUND, CLOSE = FC_IDLE, FC_AGAIN_ROUND, FC_CLOSE
EV_NOTHING, EV_PUMP, EV_CONNECT_FAILED, EV_RESET = (FC_EV_NOTHING, FC_EV_PUMP,
                                                     FC_EV_CONNECT_FAILED, FC_EV_RESET)
PROCESS_RESET, PROCESS_ERROR = PIPES_VF_RESET, PIPES_VF_ERROR   # process() results
STREAMER_READS, BOUNCE_SIZE = FC_STREAMER_READS, FC_BOUNCE_SIZE
OP_NAMES = {FC_RECV: "RECV", FC_SEND: "SEND", FC_PROCESS: "PROCESS", FC_GET_PIPE: "GET_PIPE",
            FC_SPLICE_OUT: "SPLICE_OUT", FC_SPLICE_IN: "SPLICE_IN", FC_BOUNCE: "BOUNCE",
            FC_SHUTDOWN: "SHUTDOWN"}


class Op(NamedTuple):
    """One operation the core asks for."""

    kind: int           # RECV, SEND, ...
    size: int           # RECV, SPLICE_IN, BOUNCE: room; SEND, SPLICE_OUT: bytes; PROCESS:
                        # input offered
    more: bool          # SEND, SPLICE_OUT: the source's FIN is queued behind (MSG_MORE)
    eof: bool           # PROCESS: PIPES_VF_EOF
    out_cap: int        # PROCESS: output room
    check_urgent: bool  # SPLICE_IN: an empty result may be the urgent mark

    @property
    def name(self):
        return OP_NAMES[self.kind]


cdef class FlowCore:
    """One flow's core. FlowCore(mode, buffer_size=65536, out_size=None, connecting=False):
    mode IDENTITY, INPLACE or STREAM; out_size (stream output buffers) defaults to
    buffer_size."""

    cdef fc_flow core
    cdef fc_step steps[2]
    cdef fc_op ops[2]
    cdef bint have_op[2]
    cdef unsigned char *block

    def __cinit__(self, int mode, size_t buffer_size=65536, out_size=None,
                  bint connecting=False):
        cdef size_t osize = buffer_size if out_size is None else out_size
        cdef bint stream = mode == FC_STREAM
        if mode not in (FC_IDENTITY, FC_INPLACE, FC_STREAM):
            raise ValueError(f"unknown mode {mode}")
        if buffer_size < 1 or osize < 1:
            raise ValueError("buffers have at least 1 byte")
        self.block = <unsigned char *>malloc(2 * buffer_size + (2 * osize if stream else 0))
        if self.block == NULL:
            raise MemoryError()
        fc_init(&self.core, mode, connecting)
        fc_set_buffers(&self.core, 0, self.block, buffer_size,
                       self.block + 2 * buffer_size if stream else NULL, osize)
        fc_set_buffers(&self.core, 1, self.block + buffer_size, buffer_size,
                       self.block + 2 * buffer_size + osize if stream else NULL, osize)

    def __dealloc__(self):
        free(self.block)

    cdef int check(self, int d) except -1:
        if d != 0 and d != 1:
            raise ValueError(f"direction is 0 (up) or 1 (down), not {d}")
        return 0

    @property
    def state(self):
        return self.core.state

    @property
    def why(self):
        """Why the function's flow is reset (text), or None."""
        text = fc_why_text(self.core.why)
        return None if text == NULL else text.decode()

    @property
    def use_pipes(self):
        return bool(self.core.use_pipes)

    def readiness(self, int side):
        """{"rd", "wr", "hup", "fin"} of side, as cached by the core."""
        self.check(side)
        return {"rd": bool(self.core.rd[side]), "wr": bool(self.core.wr[side]),
                "hup": bool(self.core.hup[side]), "fin": bool(self.core.fin[side])}

    def direction(self, int d):
        """Direction d's state: a dict of the fc_dir fields."""
        self.check(d)
        cdef fc_dir *x = &self.core.dir[d]
        return {"path": x.path, "pending": x.pending, "olen": x.olen, "cap": x.cap,
                "ocap": x.ocap, "pipe_cap": x.pipe_cap, "eof": bool(x.eof),
                "more": bool(x.more), "starved": bool(x.starved), "flushed": bool(x.flushed),
                "done": bool(x.done), "fin_at_close": bool(x.fin_at_close),
                "big_reads": x.big_reads}

    def event(self, int side, *, bint readable=False, bint writable=False, bint hup=False,
              bint rdhup=False, bint error=False, int so_error=0):
        """An epoll event on side (readable: EPOLLIN and the like; writable: EPOLLOUT; hup:
        RDHUP/PRI/ERR/HUP, read to the end; rdhup: the peer's FIN; error: ERR/HUP, which
        also makes the side readable and writable). Returns EV_PUMP, EV_NOTHING,
        EV_CONNECT_FAILED or EV_RESET."""
        cdef int ev = 0
        self.check(side)
        if readable or hup or rdhup or error:
            ev |= FC_EV_IN
        if hup or rdhup or error:
            ev |= FC_EV_HUP
        if rdhup:
            ev |= FC_EV_RDHUP
        if writable or error:
            ev |= FC_EV_OUT
        if writable:
            ev |= FC_EV_WRITABLE
        if error:
            ev |= FC_EV_ERR
        return fc_event(&self.core, side, ev,
                        so_error if fc_wants_so_error(&self.core, side) else 0)

    def begin(self, int d):
        """Starts a step of direction d."""
        self.check(d)
        fc_begin(&self.steps[d])
        self.have_op[d] = False

    def next(self, int d):
        """The next operation of d's step (an Op), or None when the step is over."""
        self.check(d)
        cdef fc_op *op = &self.ops[d]
        if self.have_op[d]:
            raise RuntimeError("report the last operation with done() first")
        if fc_next(&self.core, d, &self.steps[d], op) == FC_END:
            return None
        self.have_op[d] = True
        return Op(op.kind, op.len, bool(op.flags & FC_MORE), bool(op.flags & PIPES_VF_EOF),
                  op.out_cap if op.kind == FC_PROCESS else 0,
                  bool(op.flags & FC_CHECK_URGENT))

    def payload(self, int d):
        """The bytes of d's current SEND or PROCESS operation (a copy)."""
        self.check(d)
        cdef fc_op *op = &self.ops[d]
        if not self.have_op[d] or op.kind not in (FC_SEND, FC_PROCESS):
            raise RuntimeError("no SEND or PROCESS operation is waiting")
        return PyBytes_FromStringAndSize(<const char *>op.buf, op.len)

    def done(self, int d, long outcome, data=None, consumed=None):
        """Reports d's current operation: outcome is a byte count, 0, AGAIN, INTR, FAILED or
        URGENT; for PROCESS the function's result (its output's length, PROCESS_RESET or
        PROCESS_ERROR) with data = the output and consumed = bytes it took. RECV with
        outcome > 0 takes data (outcome bytes, at most the room). Returns 0, or the reset
        reason (SOCKET_ERROR, VF_RESET, VF_ERROR)."""
        self.check(d)
        cdef fc_op *op = &self.ops[d]
        cdef const unsigned char[::1] view
        cdef size_t n
        if not self.have_op[d]:
            raise RuntimeError("no operation is waiting")
        if op.kind == FC_RECV and outcome > 0 or op.kind == FC_PROCESS and data:
            view = memoryview(data).cast("B")
            n = view.shape[0]
            if op.kind == FC_RECV and (n != <size_t>outcome or n > op.len):
                raise ValueError(f"RECV of {outcome} bytes with {n} bytes of data "
                                 f"(room {op.len})")
            if op.kind == FC_PROCESS and n > op.out_cap:
                n = op.out_cap      # a broken function: the core sees outcome and says so
            if n:
                memcpy(op.buf if op.kind == FC_RECV else op.out, &view[0], n)
        if op.kind == FC_PROCESS:
            op.len = op.len if consumed is None else <size_t>consumed
        self.have_op[d] = False
        return fc_done(&self.core, d, &self.steps[d], op, outcome)

    def progress(self, int d):
        """Whether d's current step progressed."""
        self.check(d)
        return bool(self.steps[d].progress)

    def round(self, int a, int b):
        """After one step each way (results: progress 0/1 or a reset reason): CLOSE,
        AGAIN_ROUND, IDLE, or the reset reason. CLOSE: the shell's graceful close sends the
        FIN of the direction that finished last (direction(d)["fin_at_close"])."""
        return fc_round(&self.core, a, b)

    def end(self):
        """Ends the flow: True the first time, False after."""
        return bool(fc_end(&self.core))

    def pipe_reusable(self, int d):
        """May d's pipe go back to the pool (the flow ending now)?"""
        self.check(d)
        return bool(fc_pipe_reusable(&self.core, d))

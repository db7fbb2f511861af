/*
 * The flow core: every decision the relay makes for a flow, without any I/O.
 *
 * Why: the per-direction rules (when to read, how much room, when the function is called,
 * when to flush, when a direction moves to splice, when the FIN may be sent, when a flow is
 * reset) are the subtlest part of the proxy. They are written here once, as static inline C,
 * so that the relay's loop (cext/relay.pyx) inlines them at no cost, and so that the same
 * rules are driven without sockets by the function driver (cext/vf.pyx FunctionDriver), by
 * the Python binding srv6pipes._flowcore (cext/flowcore.pyx) and by the playbook tests
 * (tests/unit/test_flowcore.py).
 *
 * Words: a flow is the pair of connections through the proxy, side 0 the client, side 1 the
 * server. Direction d reads from side d (its source) and writes to side 1 - d (its
 * destination): direction 0 is "up", 1 is "down".
 *
 * Inputs (what the shell tells the core):
 *   fc_event()   an epoll event on a side: readable, writable, error/hang-up, the peer's FIN
 *                queued (RDHUP), and for a connecting server socket its SO_ERROR;
 *   fc_done()    the outcome of the operation fc_next() asked for: a byte count, 0 (EOF, or
 *                success for FC_SHUTDOWN / FC_GET_PIPE), or FC_AGAIN, FC_INTR, FC_FAILED,
 *                FC_URGENT; for FC_PROCESS the function's return value and consumed count.
 * Outputs (what the core asks the shell to do), one operation at a time (struct fc_op):
 *   FC_RECV       recv(src) into op.buf, at most op.len bytes (the room left)
 *   FC_SEND       send(dst) of op.len bytes at op.buf; FC_MORE: more bytes or the FIN follow
 *   FC_PROCESS    the function: process(ctx, d, op.buf, &op.len, op.out, op.out_cap, op.flags)
 *   FC_GET_PIPE   give the direction a pipe; report its capacity (> 0) or FC_FAILED
 *   FC_SPLICE_OUT splice op.len bytes from the direction's pipe to dst (FC_MORE as above)
 *   FC_SPLICE_IN  splice at most op.len bytes from src into the pipe; with FC_CHECK_URGENT
 *                 report FC_URGENT when it moved nothing because src is at the urgent mark
 *   FC_BOUNCE     recv() at most one page (op.len) from src and write it into the empty pipe
 *   FC_SHUTDOWN   shutdown(dst, SHUT_WR): forward the FIN (not the last one, see FIN below)
 * and after each round of both directions fc_round() says: go on, idle, close, or reset
 * (with the reason). FC_CLOSE asks for a graceful close of both sides (linger off, close()),
 * which sends the last FIN. fc_end() ends a flow, exactly once.
 *
 * A step of one direction is a fixed sequence of phases (fc_next walks them with a cursor,
 * struct fc_step, so the order lives here and not in each driver):
 *
 *   GATE   a finished direction does nothing;
 *   SEND   bytes read (buffer, pipe) or output by the function (stream) go to dst if it is
 *          writable, once per step;
 *   SPLICE an identity direction that proved to be a bulk stream (FC_STREAMER_READS reads in
 *          a row of at least a quarter of the buffer) moves to splice as soon as its buffer
 *          is empty (bytes never overtake each other), and reads into the pipe from here;
 *   READ   if src is readable, not at EOF, and there is room, once per step. Stream: input
 *          not yet consumed that reached the end of the buffer moves to the front first;
 *   AFTER  in place: the bytes just read are transformed where they lie; splice: at the
 *          urgent mark one page is moved with recv() (splice cannot pass it);
 *   CALL   stream: the function runs once its last output was sent (bounded output, no
 *          queue): with new input it has not starved on, or again because its last output
 *          filled the output buffer, or at EOF (PIPES_VF_EOF) until a call that consumes
 *          and outputs nothing ends the direction ("flushed");
 *   FIN    the FIN is forwarded only after everything before it was delivered: buffer and
 *          pipe empty, and on the stream path the function flushed and its output sent.
 *          With shutdown() while the other direction goes on (a half-close); the last FIN
 *          (the other direction finished) is left to the close that follows in the same
 *          round (fc_dir.fin_at_close): close() sends it after what is queued, as
 *          shutdown() would, so the shell makes one system call less per flow.
 *
 * Readiness is cached per side (edge-triggered epoll): set by events, cleared by EAGAIN, or
 * by a short recv(), which proves the receive queue empty, unless a FIN, error or urgent
 * data was signalled ("hup": then read until EAGAIN, EOF or error). On the splice path
 * EAGAIN means "socket empty" or "pipe full" (a pipe counts pages): only with an empty pipe
 * does it clear the readiness.
 *
 * A reset: any operation failing (FC_FAILED), the function asking (PIPES_VF_RESET), or
 * breaking its contract (PIPES_VF_ERROR, output beyond out_cap, consuming more than offered,
 * stalling on a full input buffer, leaving input at EOF, an INPLACE call not returning its
 * length). A pipe may go back to a pool only when it is empty (fc_pipe_reusable).
 */
#ifndef SRV6PIPES_FLOWCORE_H
#define SRV6PIPES_FLOWCORE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "srv6pipes_vf.h"

#define FC_STREAMER_READS 2     /* big reads in a row that move identity to splice */
#define FC_BOUNCE_SIZE 4096     /* one page: always fits an empty pipe */

/* How a flow's bytes are handled (fc_init's mode). */
#define FC_IDENTITY 0   /* buffer path, then splice for bulk directions */
#define FC_INPLACE 1    /* one buffer, each read transformed where it lies */
#define FC_STREAM 2     /* input and output buffer per direction */

/* A direction's path. */
#define FC_PATH_BUFFER 0
#define FC_PATH_STREAM 1
#define FC_PATH_PIPE 2

/* Flow states. */
#define FC_FREE 0
#define FC_CONNECTING 1
#define FC_OPEN 2

/* How a flow ended (fc_end): also the relay's counter indexes C_CLOSED.. (relay.pyx). */
#define FC_CLOSED 2
#define FC_RESET 3
#define FC_CONNECT_FAILED 4

/* Operations (fc_op.kind). */
#define FC_END 0
#define FC_RECV 1
#define FC_SEND 2
#define FC_PROCESS 3
#define FC_GET_PIPE 4
#define FC_SPLICE_OUT 5
#define FC_SPLICE_IN 6
#define FC_BOUNCE 7
#define FC_SHUTDOWN 8

/* fc_op.flags besides PIPES_VF_EOF (FC_PROCESS). */
#define FC_MORE 0x100           /* SEND, SPLICE_OUT: the source's FIN is queued behind */
#define FC_CHECK_URGENT 0x200   /* SPLICE_IN: an empty result may be the urgent mark */

/* Outcomes besides byte counts (fc_done's result). */
#define FC_AGAIN (-1001)        /* would block */
#define FC_INTR (-1002)         /* interrupted: try again */
#define FC_FAILED (-1003)       /* any other error */
#define FC_URGENT (-1004)       /* SPLICE_IN at the urgent mark */

/* Step and round results below 0: why the flow must be reset. */
#define FC_SOCKET_ERROR (-1)
#define FC_VF_RESET (-2)
#define FC_VF_ERROR (-3)

/* Why a function's flow is reset (fc_flow.why, set with FC_VF_RESET / FC_VF_ERROR). */
#define FC_WHY_NONE 0
#define FC_WHY_ASKED 1      /* process returned PIPES_VF_RESET */
#define FC_WHY_FAILED 2     /* process returned PIPES_VF_ERROR */
#define FC_WHY_RESULT 3     /* a result out of range: output beyond out_cap, consumed more */
#define FC_WHY_INPLACE 4    /* an INPLACE call that did not return (and consume) its length */
#define FC_WHY_EOF_LEFT 5   /* at EOF it will not take the input left: bytes would be lost */
#define FC_WHY_STALLED 6    /* a full input buffer it will not consume */

/* The words for each FC_WHY_* (FlowError messages, test drivers); NULL for FC_WHY_NONE. */
static inline const char *fc_why_text(int why)
{
    switch (why) {
    case FC_WHY_ASKED: return "process reset the flow";
    case FC_WHY_FAILED: return "process failed (PIPES_VF_ERROR)";
    case FC_WHY_RESULT: return "process returned a result out of range (output beyond "
                               "out_cap, or consumed more than offered)";
    case FC_WHY_INPLACE: return "an INPLACE process did not return and consume its length";
    case FC_WHY_EOF_LEFT: return "at EOF process will not take the input left";
    case FC_WHY_STALLED: return "process stalls on a full input buffer";
    default: return NULL;
    }
}

/* fc_round's other results. */
#define FC_IDLE 0       /* nothing progressed: wait for events */
#define FC_AGAIN_ROUND 1
#define FC_CLOSE 2      /* both directions finished: close gracefully (linger off, close());
                           that close sends the last FIN (fin_at_close) */

/* fc_event's event bits (the shell maps epoll's). */
#define FC_EV_IN 0x1        /* EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLERR | EPOLLHUP */
#define FC_EV_OUT 0x2       /* EPOLLOUT | EPOLLERR | EPOLLHUP */
#define FC_EV_WRITABLE 0x4  /* EPOLLOUT itself */
#define FC_EV_HUP 0x8       /* EPOLLRDHUP | EPOLLPRI | EPOLLERR | EPOLLHUP: read to the end */
#define FC_EV_RDHUP 0x10    /* EPOLLRDHUP: the peer's FIN is queued behind the data */
#define FC_EV_ERR 0x20      /* EPOLLERR | EPOLLHUP */

/* fc_event's results. */
#define FC_EV_NOTHING 0
#define FC_EV_PUMP 1
#define FC_EV_CONNECT_FAILED 2
#define FC_EV_RESET 3

/* Step phases (struct fc_step.phase). */
#define FC_PH_GATE 0
#define FC_PH_SEND 1
#define FC_PH_SPLICE 2
#define FC_PH_READ 3
#define FC_PH_AFTER 4
#define FC_PH_CALL 5
#define FC_PH_FIN 6
#define FC_PH_END 7

struct fc_dir {
    unsigned char *buf;     /* buffer / in place: buf[start:start + pending] read, not yet
                               sent; stream: read, not yet consumed by the function */
    size_t start;
    size_t pending;         /* splice: bytes in the pipe */
    size_t cap;             /* buf's size */
    unsigned char *obuf;    /* stream: function output obuf[ostart:ostart + olen] to send */
    size_t ostart;
    size_t olen;
    size_t ocap;            /* obuf's size */
    size_t pipe_cap;        /* splice: the pipe's capacity */
    size_t fresh;           /* in place: bytes just read at buf + start + pending */
    int path;               /* FC_PATH_* */
    int big_reads;          /* identity on the buffer path: reads in a row of >= cap / 4 */
    unsigned char eof;      /* src returned EOF */
    unsigned char more;     /* stream: the last call filled obuf; call again */
    unsigned char starved;  /* stream: the last call took and gave nothing; wait for input */
    unsigned char flushed;  /* stream: the EOF flush is complete */
    unsigned char done;     /* FIN forwarded, or left to the close (fin_at_close) */
    unsigned char fin_at_close; /* the last FIN: no FC_SHUTDOWN, the graceful close sends it */
    unsigned char bounce;   /* splice: at the urgent mark with an empty pipe */
};

struct fc_flow {
    int state;              /* FC_FREE, FC_CONNECTING, FC_OPEN */
    int mode;               /* FC_IDENTITY, FC_INPLACE, FC_STREAM */
    unsigned char rd[2];    /* cached readiness per side */
    unsigned char wr[2];
    unsigned char hup[2];   /* FC_EV_HUP seen: a short read proves nothing */
    unsigned char fin[2];   /* FC_EV_RDHUP seen: the peer's FIN is queued */
    unsigned char use_pipes;    /* identity: bulk directions may move to splice */
    int why;                /* FC_WHY_*: the function's part in a reset */
    struct fc_dir dir[2];
};

struct fc_op {
    int kind;               /* FC_END, FC_RECV ... */
    int flags;              /* FC_MORE, FC_CHECK_URGENT, PIPES_VF_EOF */
    unsigned char *buf;     /* RECV: where to; SEND, PROCESS: from */
    size_t len;             /* bytes / room; PROCESS: offered, then consumed (in_len) */
    unsigned char *out;     /* PROCESS: output room */
    size_t out_cap;
};

struct fc_step {
    int phase;
    int progress;           /* the step did something: the pump goes round again */
};

/* A new flow: both sides assumed ready (an edge-triggered registration reports what is
 * already there anyway), identity allowed to splice. The buffers are given with
 * fc_set_buffers. */
static inline void fc_init(struct fc_flow *f, int mode, int connecting)
{
    int d;
    memset(f, 0, sizeof(*f));
    f->state = connecting ? FC_CONNECTING : FC_OPEN;
    f->mode = mode;
    f->use_pipes = mode == FC_IDENTITY;
    for (d = 0; d < 2; d++) {
        f->rd[d] = 1;
        f->wr[d] = 1;
        f->dir[d].path = mode == FC_STREAM ? FC_PATH_STREAM : FC_PATH_BUFFER;
    }
}

/* Direction d's buffers: buf of cap bytes, and on the stream path obuf of ocap bytes. */
static inline void fc_set_buffers(struct fc_flow *f, int d, unsigned char *buf, size_t cap,
                                  unsigned char *obuf, size_t ocap)
{
    f->dir[d].buf = buf;
    f->dir[d].cap = cap;
    f->dir[d].obuf = obuf;
    f->dir[d].ocap = ocap;
}

/* An epoll event on side. so_error: the server socket's SO_ERROR, read by the shell only
 * while connecting (fc_wants_so_error). Returns FC_EV_PUMP (pump the flow), FC_EV_NOTHING,
 * FC_EV_CONNECT_FAILED or FC_EV_RESET (end the flow so). */
static inline int fc_wants_so_error(const struct fc_flow *f, int side)
{
    return f->state == FC_CONNECTING && side == 1;
}

static inline int fc_event(struct fc_flow *f, int side, int ev, int so_error)
{
    if (ev & FC_EV_IN) {
        f->rd[side] = 1;
        if (ev & FC_EV_HUP)
            f->hup[side] = 1;
        if (ev & FC_EV_RDHUP)
            f->fin[side] = 1;
    }
    if (ev & FC_EV_OUT)
        f->wr[side] = 1;
    if (f->state == FC_CONNECTING) {
        if (side == 1) {
            if (so_error != 0 || (ev & FC_EV_ERR))
                return FC_EV_CONNECT_FAILED;
            if (!(ev & FC_EV_WRITABLE))
                return FC_EV_NOTHING;
            f->state = FC_OPEN;     /* connected: pump what both sides hold */
            return FC_EV_PUMP;
        }
        /* The client may send (even half-close) before the server answers: that is read
         * once connected. An error means it gave up: abort the connect. */
        return (ev & FC_EV_ERR) ? FC_EV_RESET : FC_EV_NOTHING;
    }
    return f->state == FC_OPEN ? FC_EV_PUMP : FC_EV_NOTHING;
}

/* Ends the flow. Returns 1 the first time, 0 if it had ended already: a flow ends exactly
 * once (FC_CLOSED, FC_RESET or FC_CONNECT_FAILED; the caller counts it). */
static inline int fc_end(struct fc_flow *f)
{
    if (f->state == FC_FREE)
        return 0;
    f->state = FC_FREE;
    return 1;
}

/* May direction d's pipe go back to a pool for another flow? Only if it is empty: the
 * bytes of a reset flow must never reach the next flow's peer. */
static inline int fc_pipe_reusable(const struct fc_flow *f, int d)
{
    return f->dir[d].path == FC_PATH_PIPE && f->dir[d].pending == 0;
}

static inline void fc_begin(struct fc_step *s)
{
    s->phase = FC_PH_GATE;
    s->progress = 0;
}

static inline int fc_op_set(struct fc_op *op, int kind, unsigned char *buf, size_t len,
                            int flags)
{
    op->kind = kind;
    op->buf = buf;
    op->len = len;
    op->flags = flags;
    return kind;
}

/* The next operation of direction d's step, or FC_END when the step is over. */
static inline int fc_next(struct fc_flow *f, int d, struct fc_step *s, struct fc_op *op)
{
    struct fc_dir *x = &f->dir[d];
    int src = d, dst = 1 - d;
    size_t room;
    for (;;) {
        switch (s->phase++) {
        case FC_PH_GATE:
            if (x->done)
                s->phase = FC_PH_END;
            break;
        case FC_PH_SEND:
            if (!f->wr[dst])
                break;
            if (x->path == FC_PATH_STREAM) {
                if (x->olen)
                    return fc_op_set(op, FC_SEND, x->obuf + x->ostart, x->olen, 0);
            } else if (x->pending) {
                /* Once the source's FIN is known to follow, MSG_MORE holds the last bytes
                 * back for the shutdown() (or, for the last FIN, the close()) that comes
                 * next: the FIN rides on the last data segment instead of costing a packet
                 * of its own. */
                return fc_op_set(op, x->path == FC_PATH_PIPE ? FC_SPLICE_OUT : FC_SEND,
                                 x->path == FC_PATH_PIPE ? NULL : x->buf + x->start,
                                 x->pending, f->fin[src] ? FC_MORE : 0);
            }
            break;
        case FC_PH_SPLICE:
            if (x->path == FC_PATH_BUFFER && f->use_pipes && x->big_reads >= FC_STREAMER_READS
                    && x->pending == 0 && !x->eof)
                return fc_op_set(op, FC_GET_PIPE, NULL, 0, 0);
            break;
        case FC_PH_READ:
            if (x->eof || !f->rd[src])
                break;
            if (x->path == FC_PATH_PIPE) {
                if (x->pending < x->pipe_cap)
                    return fc_op_set(op, FC_SPLICE_IN, NULL, x->pipe_cap - x->pending,
                                     f->hup[src] ? FC_CHECK_URGENT : 0);
                break;
            }
            if (x->pending == 0)
                x->start = 0;
            else if (x->path == FC_PATH_STREAM && x->start + x->pending == x->cap) {
                /* Unconsumed input at the end of the buffer: move it to the front. */
                memmove(x->buf, x->buf + x->start, x->pending);
                x->start = 0;
            }
            room = x->cap - x->start - x->pending;
            if (room)
                return fc_op_set(op, FC_RECV, x->buf + x->start + x->pending, room, 0);
            break;
        case FC_PH_AFTER:
            if (x->fresh) {
                fc_op_set(op, FC_PROCESS, x->buf + x->start + x->pending, x->fresh, 0);
                op->out = op->buf;
                op->out_cap = x->fresh;
                return FC_PROCESS;
            }
            if (x->bounce)
                return fc_op_set(op, FC_BOUNCE, NULL, FC_BOUNCE_SIZE, 0);
            break;
        case FC_PH_CALL:
            if (x->path == FC_PATH_STREAM && x->olen == 0 && !x->flushed
                    && (x->eof || x->more || (x->pending && !x->starved))) {
                fc_op_set(op, FC_PROCESS, x->buf + x->start, x->pending,
                          x->eof ? PIPES_VF_EOF : 0);
                op->out = x->obuf;
                op->out_cap = x->ocap;
                return FC_PROCESS;
            }
            break;
        case FC_PH_FIN:
            /* Never forward the FIN while bytes before it are still to be delivered. */
            if (x->path == FC_PATH_STREAM ? (x->flushed && x->olen == 0)
                                          : (x->eof && x->pending == 0)) {
                if (!f->dir[1 - d].done)
                    return fc_op_set(op, FC_SHUTDOWN, NULL, 0, 0);
                /* The last FIN: both directions are finished now, fc_round says FC_CLOSE
                 * this round, and the graceful close() sends this FIN: no shutdown(). */
                x->done = 1;
                x->fin_at_close = 1;
                s->progress = 1;
            }
            break;
        default:
            s->phase = FC_PH_END;
            op->kind = FC_END;
            return FC_END;
        }
    }
}

static inline int fc_vf_fail(struct fc_flow *f, int result, int why)
{
    f->why = why;
    return result;
}

/* The outcome of op: a byte count, 0, FC_AGAIN, FC_INTR, FC_FAILED or FC_URGENT; for
 * FC_PROCESS the function's return value (op->len then holds what it consumed). Returns 0,
 * or FC_SOCKET_ERROR / FC_VF_RESET / FC_VF_ERROR: the flow must be reset. */
static inline int fc_done(struct fc_flow *f, int d, struct fc_step *s, const struct fc_op *op,
                          ssize_t r)
{
    struct fc_dir *x = &f->dir[d];
    int src = d, dst = 1 - d;
    switch (op->kind) {
    case FC_GET_PIPE:
        if (r > 0) {
            x->path = FC_PATH_PIPE;
            x->pipe_cap = (size_t)r;
            x->start = 0;               /* the rest of the step on the splice path */
        } else {
            f->use_pipes = 0;           /* no pipe: the buffer path for good, both ways */
        }
        return 0;
    case FC_SEND:
    case FC_SPLICE_OUT:
        if (r > 0) {
            if (x->path == FC_PATH_STREAM) {
                x->ostart += (size_t)r;
                x->olen -= (size_t)r;
            } else {
                x->start += (size_t)r;
                x->pending -= (size_t)r;
            }
            s->progress = 1;
        } else if (r == FC_AGAIN) {
            f->wr[dst] = 0;
        } else if (r == FC_INTR) {
            s->progress = 1;
        } else if (r != 0 || op->kind == FC_SEND) {
            return FC_SOCKET_ERROR;
        }
        return 0;
    case FC_RECV:
        if (r > 0) {
            /* A short TCP read means the receive queue was empty: data arriving later
             * wakes epoll again. Not once a FIN/RST was signalled: nothing would report it
             * again. */
            if ((size_t)r < op->len && !f->hup[src])
                f->rd[src] = 0;
            s->progress = 1;
            if (x->path == FC_PATH_STREAM) {
                x->pending += (size_t)r;
                x->starved = 0;
            } else if (f->mode == FC_INPLACE) {
                x->fresh = (size_t)r;   /* transformed in the AFTER phase */
            } else {
                if (f->use_pipes)
                    x->big_reads = (size_t)r * 4 >= x->cap ? x->big_reads + 1 : 0;
                x->pending += (size_t)r;
            }
        } else if (r == 0) {
            x->eof = 1;
            s->progress = 1;
        } else if (r == FC_AGAIN) {
            f->rd[src] = 0;
        } else if (r == FC_INTR) {
            s->progress = 1;
        } else {
            return FC_SOCKET_ERROR;
        }
        return 0;
    case FC_SPLICE_IN:
        if (r > 0) {
            x->pending += (size_t)r;
            s->progress = 1;
        } else if (r == FC_INTR) {
            s->progress = 1;
        } else if (r == FC_URGENT) {
            /* splice() cannot read past TCP urgent data: once the pipe is empty, one page
             * is moved with recv(), which drops the urgent byte as the buffer path does. */
            if (x->pending == 0)
                x->bounce = 1;
        } else if (r == 0) {
            x->eof = 1;
            s->progress = 1;
        } else if (r == FC_AGAIN) {
            /* "Socket empty" or "pipe full": only an empty pipe proves the first. */
            if (x->pending == 0)
                f->rd[src] = 0;
        } else {
            return FC_SOCKET_ERROR;
        }
        return 0;
    case FC_BOUNCE:
        x->bounce = 0;
        if (r > 0)
            x->pending += (size_t)r;
        else if (r == 0)
            x->eof = 1;
        else if (r != FC_AGAIN && r != FC_INTR)
            return FC_SOCKET_ERROR;
        s->progress = 1;
        return 0;
    case FC_PROCESS:
        if (r == PIPES_VF_RESET)
            return fc_vf_fail(f, FC_VF_RESET, FC_WHY_ASKED);
        if (r == PIPES_VF_ERROR)
            return fc_vf_fail(f, FC_VF_ERROR, FC_WHY_FAILED);
        if (x->path != FC_PATH_STREAM) {   /* in place */
            size_t n = x->fresh;
            x->fresh = 0;
            if (r != (ssize_t)n || op->len != n)
                return fc_vf_fail(f, FC_VF_ERROR, FC_WHY_INPLACE);
            x->pending += n;
            return 0;
        }
        if (r < 0 || (size_t)r > x->ocap || op->len > x->pending)
            return fc_vf_fail(f, FC_VF_ERROR, FC_WHY_RESULT);
        x->start += op->len;
        x->pending -= op->len;
        x->ostart = 0;
        x->olen = (size_t)r;
        x->more = (size_t)r == x->ocap;
        if (r > 0 || op->len > 0) {
            s->progress = 1;
        } else if (x->eof) {
            if (x->pending)             /* it will never take the rest: bytes would be lost */
                return fc_vf_fail(f, FC_VF_ERROR, FC_WHY_EOF_LEFT);
            x->flushed = 1;
            s->progress = 1;
        } else if (x->pending == x->cap) {   /* a full buffer it will not consume */
            return fc_vf_fail(f, FC_VF_ERROR, FC_WHY_STALLED);
        } else {
            x->starved = 1;             /* it waits for more input */
        }
        return 0;
    case FC_SHUTDOWN:
        if (r != 0)
            return FC_SOCKET_ERROR;
        x->done = 1;
        s->progress = 1;
        return 0;
    }
    return 0;
}

/* After a round (one step of each direction, a and b their results: progress 0/1 or a
 * reset reason < 0): FC_CLOSE, FC_AGAIN_ROUND, FC_IDLE, or the reset reason. */
static inline int fc_round(const struct fc_flow *f, int a, int b)
{
    if (a < 0)
        return a;
    if (b < 0)
        return b;
    if (f->dir[0].done && f->dir[1].done)
        return FC_CLOSE;
    return (a | b) ? FC_AGAIN_ROUND : FC_IDLE;
}

#endif

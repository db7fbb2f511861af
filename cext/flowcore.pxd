# The flow core (cext/flowcore.h) for Cython: `from flowcore cimport ...`. Declarations only;
# the header's comment is the contract. Every function is static inline: the relay's loop,
# the function driver and the Python binding (flowcore.pyx) compile their own copy.

cdef extern from "flowcore.h" nogil:
    enum:
        FC_STREAMER_READS
        FC_BOUNCE_SIZE
        FC_IDENTITY
        FC_INPLACE
        FC_STREAM
        FC_PATH_BUFFER
        FC_PATH_STREAM
        FC_PATH_PIPE
        FC_FREE
        FC_CONNECTING
        FC_OPEN
        FC_CLOSED
        FC_RESET
        FC_CONNECT_FAILED
        FC_END
        FC_RECV
        FC_SEND
        FC_PROCESS
        FC_GET_PIPE
        FC_SPLICE_OUT
        FC_SPLICE_IN
        FC_BOUNCE
        FC_SHUTDOWN
        FC_MORE
        FC_CHECK_URGENT
        FC_AGAIN
        FC_INTR
        FC_FAILED
        FC_URGENT
        FC_SOCKET_ERROR
        FC_VF_RESET
        FC_VF_ERROR
        FC_WHY_NONE
        FC_WHY_ASKED
        FC_WHY_FAILED
        FC_WHY_RESULT
        FC_WHY_INPLACE
        FC_WHY_EOF_LEFT
        FC_WHY_STALLED
        FC_IDLE
        FC_AGAIN_ROUND
        FC_CLOSE
        FC_EV_IN
        FC_EV_OUT
        FC_EV_WRITABLE
        FC_EV_HUP
        FC_EV_RDHUP
        FC_EV_ERR
        FC_EV_NOTHING
        FC_EV_PUMP
        FC_EV_CONNECT_FAILED
        FC_EV_RESET

    struct fc_dir:
        unsigned char *buf
        size_t start
        size_t pending
        size_t cap
        unsigned char *obuf
        size_t ostart
        size_t olen
        size_t ocap
        size_t pipe_cap
        size_t fresh
        int path
        int big_reads
        bint eof
        bint more
        bint starved
        bint flushed
        bint done
        bint fin_at_close
        bint bounce

    struct fc_flow:
        int state
        int mode
        bint rd[2]
        bint wr[2]
        bint hup[2]
        bint fin[2]
        bint use_pipes
        int why
        fc_dir dir[2]

    struct fc_op:
        int kind
        int flags
        unsigned char *buf
        size_t len
        unsigned char *out
        size_t out_cap

    struct fc_step:
        int phase
        int progress

    void fc_init(fc_flow *f, int mode, int connecting)
    void fc_set_buffers(fc_flow *f, int d, unsigned char *buf, size_t cap,
                        unsigned char *obuf, size_t ocap)
    bint fc_wants_so_error(const fc_flow *f, int side)
    int fc_event(fc_flow *f, int side, int ev, int so_error)
    bint fc_end(fc_flow *f)
    const char *fc_why_text(int why)
    bint fc_pipe_reusable(const fc_flow *f, int d)
    void fc_begin(fc_step *s)
    int fc_next(fc_flow *f, int d, fc_step *s, fc_op *op)
    int fc_done(fc_flow *f, int d, fc_step *s, const fc_op *op, ssize_t r)
    int fc_round(const fc_flow *f, int a, int b)

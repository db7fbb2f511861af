# The C ABI of virtual functions (cext/srv6pipes_vf.h) for Cython: `from srv6pipes_vf cimport ...`.
# Declarations only; the header's comment is the contract. The callback types are declared
# here (not as the header's own names) because the header has no typedefs for them.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

ctypedef int (*vf_init_fn)() noexcept nogil
ctypedef void *(*vf_spawn_fn)(uint32_t params, const pipes_flow_info *flow) noexcept nogil
ctypedef ssize_t (*vf_process_fn)(void *ctx, int direction, const uint8_t *inp, size_t *in_len,
                                  uint8_t *out, size_t out_cap, int flags) noexcept nogil
ctypedef void (*vf_despawn_fn)(void *ctx) noexcept nogil
ctypedef void (*vf_deinit_fn)() noexcept nogil

cdef extern from "srv6pipes_vf.h" nogil:
    enum:
        PIPES_VF_ABI
        PIPES_UP
        PIPES_DOWN
        PIPES_VF_EOF
        PIPES_VF_RESET
        PIPES_VF_ERROR
        PIPES_VF_INPLACE

    struct pipes_flow_info:
        uint8_t client[16]
        uint8_t server[16]
        uint8_t function_address[16]
        uint16_t client_port
        uint16_t server_port
        uint32_t params

    struct pipes_func_desc:
        uint32_t id
        const char *name
        const char *description
        uint32_t flags
        vf_init_fn init
        vf_spawn_fn spawn
        vf_process_fn process
        vf_despawn_fn despawn
        vf_deinit_fn deinit

/* srv6pipes_vf.h: the C ABI of SRv6Pipes virtual functions (VFs).
 *
 * A VF module is a shared object (cc -shared -fPIC) that exports one array, `all_funcs`,
 * of function descriptors, ended by an entry whose name is NULL, and the ABI version it was
 * built against:
 *
 *     #include "srv6pipes_vf.h"
 *     PIPES_VF_MODULE;                       // exports pipes_vf_abi = PIPES_VF_ABI
 *     const struct pipes_func_desc all_funcs[] = {
 *         { .id = 0x100, .name = "caesar", .spawn = ..., .process = ..., .despawn = ... },
 *         { 0 }
 *     };
 *
 * `pipesctl load /path/module.so` loads it into every worker of a running pipesd; from then
 * on a connection whose function address carries function bits == id runs that function.
 * Each worker is a separate process, so a module's globals are per worker.
 *
 * Callbacks by lifetime (the paper's init / spawn / process / despawn / deinit):
 *
 *   init()       once per worker process, after dlopen, before any spawn. Non-zero refuses
 *                the load (the worker then unloads the module). Optional.
 *   deinit()     once per worker process before dlclose (after the last despawn). Optional.
 *   spawn(params, flow)
 *                once per flow (connection through the proxy), with the parameter bits of
 *                the function address. Returns the flow's context (any non-NULL pointer; use
 *                PIPES_VF_NO_CONTEXT if the function keeps no state); NULL resets the flow.
 *   process(ctx, direction, in, &in_len, out, out_cap, flags)
 *                called for the bytes of one direction; see "streaming" below.
 *   despawn(ctx) once per flow when both of its connections are closed (also after a reset).
 *                Optional.
 *
 * Streaming (per direction, PIPES_UP = client -> server, PIPES_DOWN = server -> client):
 *   - `in` holds *in_len bytes not yet consumed. The function sets *in_len to how many it
 *     consumed (0 .. the value on entry); the rest is offered again, followed by newer bytes.
 *   - It writes at most out_cap bytes to `out` and returns how many, or PIPES_VF_RESET to
 *     reset the flow (both connections get an RST; counted as vf_resets), or
 *     PIPES_VF_ERROR (counted as vf_errors, also resets).
 *   - Output is bounded per call: a function that holds more output than out_cap (say, a
 *     decompressor) returns out_cap bytes and keeps the rest; it is called again, with
 *     in_len possibly 0, once the relay has sent them. A call with *in_len == 0 means "give
 *     me whatever output you hold".
 *   - flags & PIPES_VF_EOF: the source has sent its FIN; no more input will come in this
 *     direction. The relay keeps calling (with PIPES_VF_EOF) until a call consumes all of
 *     `in` and returns 0; only then is the FIN forwarded. That is where a compressor flushes.
 *   - A call that consumes nothing and produces nothing while the relay's input buffer is
 *     full (or at EOF) can never progress: the flow is reset and counted as vf_errors.
 *   - `in` and `out` never overlap, unless the descriptor has PIPES_VF_INPLACE: then the
 *     relay passes out == in and out_cap == *in_len, and process must consume everything and
 *     return *in_len (same-length transforms: xor, byte counters, pattern scanners). It is
 *     never called with PIPES_VF_EOF. This saves a copy per chunk.
 *
 * process runs in the worker's relay loop: it must not block, and it should take time in
 * proportion to its input. The relay calls it for at most one chunk (the buffer size, 64 KiB
 * by default) at a time.
 */
#ifndef SRV6PIPES_VF_H
#define SRV6PIPES_VF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PIPES_VF_ABI 1

#define PIPES_UP   0   /* client -> server */
#define PIPES_DOWN 1   /* server -> client */

/* process() flags */
#define PIPES_VF_EOF 0x1

/* process() results besides a byte count */
#define PIPES_VF_RESET (-1)   /* the function asks for the flow to be reset (e.g. DPI block) */
#define PIPES_VF_ERROR (-2)   /* the function failed (counted as an error), flow reset */

/* pipes_func_desc.flags */
#define PIPES_VF_INPLACE 0x1  /* same-length transform: out == in, consume everything */

/* A context for functions that keep no per-flow state (spawn must not return NULL). */
#define PIPES_VF_NO_CONTEXT ((void *)1)

/* What a function may know about its flow (filled by the worker at spawn time). */
struct pipes_flow_info {
    uint8_t client[16];          /* client IPv6 address (the flow's source) */
    uint8_t server[16];          /* final destination address */
    uint8_t function_address[16];/* this proxy's segment: locator | function | params */
    uint16_t client_port;        /* host byte order */
    uint16_t server_port;
    uint32_t params;             /* the parameter bits (also spawn's first argument) */
};

struct pipes_func_desc {
    uint32_t id;                 /* function bits of the address; unique in a pipesd */
    const char *name;            /* unique; NULL ends all_funcs */
    const char *description;     /* one line, shown by `pipesctl functions` (may be NULL) */
    uint32_t flags;              /* PIPES_VF_INPLACE ... */
    int (*init)(void);
    void *(*spawn)(uint32_t params, const struct pipes_flow_info *flow);
    ssize_t (*process)(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                       uint8_t *out, size_t out_cap, int flags);
    void (*despawn)(void *ctx);
    void (*deinit)(void);
};

/* Put this once in a module's source: the loader refuses modules built for another ABI. */
#define PIPES_VF_MODULE const uint32_t pipes_vf_abi = PIPES_VF_ABI

#endif

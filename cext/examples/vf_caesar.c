/* vf_caesar.c: an example C VF module for SRv6Pipes, and a template for your own.
 *
 *   build   cc -shared -fPIC -O2 -I cext -o vf_caesar.so cext/examples/vf_caesar.c
 *           (setup.py ships it as srv6pipes/modules/vf_caesar.so)
 *   load    pipesctl load /path/to/vf_caesar.so
 *   use     steer a flow through a function address whose function bits are 0x100 or
 *           0x101; its parameter bits give the shift k = params & 0xff.
 *
 *   caesar    (0x100)  client -> server: every byte + k (mod 256); server -> client: - k
 *   uncaesar  (0x101)  the inverse: up - k, down + k
 *
 * so client -> caesar@P1 -> uncaesar@P2 -> server delivers the original bytes in both
 * directions, and the segment between P1 and P2 carries shifted ones.
 *
 * cext/srv6pipes_vf.h is the contract. What this module shows:
 *   - one module, several functions: all_funcs, ended by { 0 }, plus PIPES_VF_MODULE;
 *   - per-flow state: spawn allocates it (NULL would reset the flow), despawn frees it;
 *   - per-process state: init / deinit and a few globals. Every worker process has its own
 *     copy of the globals, and a module must not assume it is the only flow in flight;
 *   - the two ways to write process (see caesar_process and uncaesar_process).
 */
#include <stdint.h>
#include <stdlib.h>

#include "srv6pipes_vf.h"

PIPES_VF_MODULE;

#define CAESAR_ID   0x100
#define UNCAESAR_ID 0x101

/* Observable and harmless: how many flows this process spawned since init, and how many
 * are still running. Not static, so a debugger (or a test, with ctypes) can read them. */
uint64_t caesar_flows_spawned;
uint64_t caesar_flows_live;
int caesar_initialised;

struct caesar_flow {
    uint8_t add[2];   /* what to add to every byte, per direction (PIPES_UP, PIPES_DOWN) */
};

/* Called once per worker process after the load, before any spawn. Non-zero refuses the
 * load. Both functions share it: the loader runs it once. */
static int caesar_init(void)
{
    caesar_flows_spawned = 0;
    caesar_flows_live = 0;
    caesar_initialised = 1;
    return 0;
}

/* Called once per worker process before the unload, after the last despawn. */
static void caesar_deinit(void)
{
    caesar_initialised = 0;
}

static void *spawn_shifts(uint8_t up, uint8_t down)
{
    struct caesar_flow *flow = malloc(sizeof *flow);
    if (flow == NULL)
        return NULL;              /* the relay resets this flow; others are unaffected */
    flow->add[PIPES_UP] = up;
    flow->add[PIPES_DOWN] = down;
    caesar_flows_spawned++;
    caesar_flows_live++;
    return flow;
}

static void *caesar_spawn(uint32_t params, const struct pipes_flow_info *info)
{
    uint8_t k = (uint8_t)(params & 0xff);
    (void)info;                   /* addresses and ports, if a function needs them */
    return spawn_shifts(k, (uint8_t)-k);
}

static void *uncaesar_spawn(uint32_t params, const struct pipes_flow_info *info)
{
    uint8_t k = (uint8_t)(params & 0xff);
    (void)info;
    return spawn_shifts((uint8_t)-k, k);
}

/* The general path, for functions whose output differs in length from their input
 * (compressors, encoders, parsers): the relay offers `*in_len` unconsumed bytes and
 * `out_cap` bytes of room. This one takes only as many bytes as fit, says so in *in_len
 * (the relay offers the rest again), and returns how many it wrote. It holds nothing back,
 * so at EOF (flags & PIPES_VF_EOF) there is nothing to flush: once the relay has no input
 * left, the call returns 0 and the FIN goes on.
 *
 * A same-length transform like this one would normally be INPLACE (see uncaesar): the
 * general path is used here to show it. */
static ssize_t caesar_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                              uint8_t *out, size_t out_cap, int flags)
{
    const struct caesar_flow *flow = ctx;
    size_t n = *in_len < out_cap ? *in_len : out_cap, i;
    uint8_t add;
    (void)flags;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    add = flow->add[direction];
    for (i = 0; i < n; i++)
        out[i] = (uint8_t)(in[i] + add);
    *in_len = n;
    return (ssize_t)n;
}

/* The INPLACE path (PIPES_VF_INPLACE in the descriptor), for same-length transforms: the
 * relay passes out == in and out_cap == *in_len, the function rewrites the bytes where
 * they are and returns *in_len. No output buffer, no copy, never called at EOF. */
static ssize_t uncaesar_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                                uint8_t *out, size_t out_cap, int flags)
{
    const struct caesar_flow *flow = ctx;
    size_t i;
    uint8_t add;
    (void)in; (void)out_cap; (void)flags;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    add = flow->add[direction];
    for (i = 0; i < *in_len; i++)
        out[i] = (uint8_t)(out[i] + add);
    return (ssize_t)*in_len;
}

/* Called once per flow when both of its connections are closed (also after a reset). */
static void caesar_despawn(void *ctx)
{
    free(ctx);
    caesar_flows_live--;
}

const struct pipes_func_desc all_funcs[] = {
    { .id = CAESAR_ID, .name = "caesar",
      .description = "adds params & 0xff to every byte going up, subtracts it going down",
      .init = caesar_init, .spawn = caesar_spawn, .process = caesar_process,
      .despawn = caesar_despawn, .deinit = caesar_deinit },
    { .id = UNCAESAR_ID, .name = "uncaesar", .flags = PIPES_VF_INPLACE,
      .description = "the inverse of caesar (in place)",
      .init = caesar_init, .spawn = uncaesar_spawn, .process = uncaesar_process,
      .despawn = caesar_despawn, .deinit = caesar_deinit },
    { 0 }
};

/* chaos-c (id 0x7f01): a TEST function that forwards bytes unchanged in random pieces; the
 * C twin of chaos.py (chaos-py, 0x7f00).
 *
 *   cc -shared -fPIC -O2 -I cext -o chaos_c.so tests/modules/chaos_c.c
 *
 * Each process call consumes a pseudo-random part of what it is offered (bounded by
 * out_cap) and outputs exactly those bytes, so the relay keeps the rest and offers it again
 * followed by newer bytes: the output must equal the input whatever the pieces. It shakes
 * out offset bugs in the relay's input buffer (partial consumption, the move to the front,
 * EOF with leftovers). The pieces come from an xorshift generator seeded from the
 * parameters, the flow's ports and the direction, so a failing flow replays the same way.
 *
 * Given bytes it consumes at least one, unless parameter bit 0x1 ("starve") is set: then it
 * sometimes consumes nothing, which the relay takes as "waiting for more input". That is
 * only allowed when the relay's input buffer cannot be full (the relay resets a flow whose
 * function makes no progress on a full buffer, or at EOF), and the function does not know
 * the buffer's size. It does know it was offered more bytes on its previous call: the
 * buffer holds at least that many, so an offer smaller than the previous one is not a full
 * buffer. chaos-c starves only then, and never at EOF (hence never twice in a row). As
 * with chaos-py, use starve only on flows whose sender keeps sending: a request it sits on
 * waits for bytes that may never come.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "srv6pipes_vf.h"

PIPES_VF_MODULE;

#define CHAOS_ID 0x7f01
#define CHAOS_STARVE 0x1

struct chaos_dir {
    uint64_t rng;             /* xorshift64 state, never 0 */
    size_t last_offered;      /* *in_len of the previous call */
};

struct chaos {
    struct chaos_dir dir[2];
    int starve;
};

static uint64_t chaos_next(struct chaos_dir *x)
{
    x->rng ^= x->rng << 13;
    x->rng ^= x->rng >> 7;
    x->rng ^= x->rng << 17;
    return x->rng;
}

/* A number in 0..n-1 (n > 0); the modulo bias does not matter here. */
static size_t chaos_below(struct chaos_dir *x, size_t n)
{
    return (size_t)(chaos_next(x) % n);
}

static void *chaos_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    struct chaos *c = calloc(1, sizeof *c);
    int d;
    if (c == NULL)
        return NULL;
    c->starve = (params & CHAOS_STARVE) != 0;
    for (d = 0; d < 2; d++) {
        uint64_t seed = ((uint64_t)params << 32) ^ ((uint64_t)flow->client_port << 16)
                        ^ flow->server_port ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(d + 1));
        c->dir[d].rng = seed ? seed : 1;
        chaos_next(&c->dir[d]);   /* spread the seed's few set bits */
    }
    return c;
}

static ssize_t chaos_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                             uint8_t *out, size_t out_cap, int flags)
{
    struct chaos *c = ctx;
    struct chaos_dir *x;
    size_t offered = *in_len, n, roll;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    x = &c->dir[direction];
    *in_len = 0;
    if (offered == 0)
        return 0;                               /* holds nothing: at EOF the FIN goes on */
    if (c->starve && !(flags & PIPES_VF_EOF) && offered < x->last_offered
            && chaos_below(x, 4) == 0) {
        x->last_offered = offered;
        return 0;
    }
    x->last_offered = offered;
    roll = chaos_below(x, 4);
    if (roll == 0)
        n = offered;                            /* all of it */
    else if (roll == 1)
        n = 1 + chaos_below(x, offered < 7 ? offered : 7);   /* a few bytes */
    else
        n = 1 + chaos_below(x, offered);        /* anything */
    if (n > out_cap)
        n = out_cap;
    memcpy(out, in, n);
    *in_len = n;
    return (ssize_t)n;
}

static void chaos_despawn(void *ctx)
{
    free(ctx);
}

const struct pipes_func_desc all_funcs[] = {
    { .id = CHAOS_ID, .name = "chaos-c",
      .description = "TEST: forwards unchanged, consuming random partial lengths",
      .spawn = chaos_spawn, .process = chaos_process, .despawn = chaos_despawn },
    { 0 }
};

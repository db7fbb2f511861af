/* C helpers for cext/relay.pyx: the per-chunk transform kernels.
 *
 * A transform is bound to a flow once, in add_flow(), as a function pointer plus a small
 * inline state (see `relay_xform`); the relay loop calls it for every chunk it reads on the
 * buffer path, with no Python involved:
 *
 *     int process(relay_xform *x, int direction, unsigned char *buf, size_t len);
 *
 * direction 0 = client -> server ("up"), 1 = server -> client ("down").  The chunk is
 * transformed in place; the return value is 0, or -1 to abort the flow (reset both sides).
 * Length-changing transforms (a later issue) will get a separate output buffer: they only
 * need a new process signature and an out-buffer per direction; the loop structure (read ->
 * process -> write pending bytes) stays the same.
 */
#ifndef SRV6PIPES_RELAY_IMPL_H
#define SRV6PIPES_RELAY_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct relay_xform relay_xform;
typedef int (*relay_process_fn)(relay_xform *x, int direction, unsigned char *buf, size_t len);

struct relay_xform {
    relay_process_fn process;   /* NULL: identity (splice fallback) */
    uint64_t key;               /* the function's parameter, e.g. the xor key byte */
    uint64_t offset[2];         /* stream offset per direction, for position-dependent transforms */
};

/* XOR every byte of buf with key: 64-bit words (key byte replicated) then the tail bytes.
 * memcpy keeps unaligned loads legal; gcc -O3 turns the word loop into SIMD. */
static inline void relay_xor_inplace(unsigned char *buf, size_t len, uint8_t key)
{
    const uint64_t k = 0x0101010101010101ULL * (uint64_t)key;
    size_t i = 0;
    if (key == 0)
        return;
    for (; i + 32 <= len; i += 32) {
        uint64_t w[4];
        memcpy(w, buf + i, 32);
        w[0] ^= k; w[1] ^= k; w[2] ^= k; w[3] ^= k;
        memcpy(buf + i, w, 32);
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, buf + i, 8);
        w ^= k;
        memcpy(buf + i, &w, 8);
    }
    for (; i < len; i++)
        buf[i] ^= (unsigned char)key;
}

/* MODE_XOR: the same single-byte key in both directions; no offset needed. */
static int relay_process_xor(relay_xform *x, int direction, unsigned char *buf, size_t len)
{
    (void)direction;
    relay_xor_inplace(buf, len, (uint8_t)x->key);
    return 0;
}

#endif

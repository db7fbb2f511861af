/* vf_builtin.h: the built-in C virtual functions of SRv6Pipes (the ABI of srv6pipes_vf.h).
 *
 *   id  name        flags    what it does
 *    1  xor         INPLACE  xors every byte with params & 0xff, both directions
 *    2  xor-passes  INPLACE  2n xor passes per chunk (net identity): the paper's Fig. 9 cost
 *    3  compress    -        up: raw deflate (sync flush per call), down: inflate
 *    4  decompress  -        the mirror: up: inflate, down: deflate
 *    7  dpi         INPLACE  Aho-Corasick scan of both directions; a match resets the flow
 *    8  count       INPLACE  flows and bytes per client prefix
 *
 * Identity (id 0) is no descriptor: the relay splices it.
 *
 * Include this header in exactly one extension, srv6pipes._vf (cext/vf.pyx). dpi and count
 * keep process-global state (the pattern set, the prefix table) in static variables here;
 * a second copy of the header in another extension would have its own, unseen state. Other
 * extensions (the relay) call the descriptors through the addresses in
 * srv6pipes._vf.BUILTIN_FUNCTIONS.
 *
 * Threads: process() runs in the worker's relay loop (one thread) and takes no lock.
 * Everything done once per flow (spawn, despawn) or from Python (new patterns, snapshots)
 * takes vf_state_lock, so Python may read while a relay thread runs without the GIL.
 */
#ifndef SRV6PIPES_VF_BUILTIN_H
#define SRV6PIPES_VF_BUILTIN_H

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ZLIB_CONST              /* z_stream.next_in is const: the relay's input is */
#include <zlib.h>

#include "srv6pipes_vf.h"

static pthread_mutex_t vf_state_lock = PTHREAD_MUTEX_INITIALIZER;

/* A flow context for functions whose only state is their parameters: the parameters live
 * in the pointer itself (shifted, tagged with bit 0 so it is never NULL), so spawn
 * allocates nothing. The functions below only use the low 16 bits. */
static inline void *vf_params_ctx(uint32_t params)
{
    return (void *)(((uintptr_t)params << 1) | 1);
}

static inline uint32_t vf_ctx_params(const void *ctx)
{
    return (uint32_t)((uintptr_t)ctx >> 1);
}

/* ---- xor ------------------------------------------------------------------------------ */

/* XOR every byte of buf with key: 64-bit words (key byte replicated) then the tail bytes.
 * memcpy keeps unaligned loads legal; gcc -O3 turns the 32-byte step into SIMD. Four
 * scalar words rather than an array: inlined into xor-passes' loop, gcc kept storing an
 * array temporary to the stack on every step. */
static inline void vf_xor_inplace(uint8_t *buf, size_t len, uint8_t key)
{
    const uint64_t k = 0x0101010101010101ULL * (uint64_t)key;
    size_t i = 0;
    if (key == 0)
        return;
    for (; i + 32 <= len; i += 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, buf + i, 8);
        memcpy(&w1, buf + i + 8, 8);
        memcpy(&w2, buf + i + 16, 8);
        memcpy(&w3, buf + i + 24, 8);
        w0 ^= k; w1 ^= k; w2 ^= k; w3 ^= k;
        memcpy(buf + i, &w0, 8);
        memcpy(buf + i + 8, &w1, 8);
        memcpy(buf + i + 16, &w2, 8);
        memcpy(buf + i + 24, &w3, 8);
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, buf + i, 8);
        w ^= k;
        memcpy(buf + i, &w, 8);
    }
    for (; i < len; i++)
        buf[i] ^= key;
}

static void *vf_params_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    (void)flow;
    return vf_params_ctx(params);
}

static ssize_t vf_xor_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                              uint8_t *out, size_t out_cap, int flags)
{
    (void)direction; (void)in; (void)out_cap; (void)flags;
    vf_xor_inplace(out, *in_len, (uint8_t)vf_ctx_params(ctx));
    return (ssize_t)*in_len;
}

/* ---- xor-passes ------------------------------------------------------------------------ */

/* n = params & 0xff (0: 1), key = (params >> 8) & 0xff (0: 0x5a). Each pair of passes
 * undoes itself; the point is the cost of touching every byte 2n times. */
static ssize_t vf_xor_passes_process(void *ctx, int direction, const uint8_t *in,
                                     size_t *in_len, uint8_t *out, size_t out_cap, int flags)
{
    const uint32_t params = vf_ctx_params(ctx);
    const unsigned n = (params & 0xff) ? (params & 0xff) : 1;
    const uint8_t key = ((params >> 8) & 0xff) ? (uint8_t)(params >> 8) : 0x5a;
    uint8_t *chunk = out;
    unsigned pass;
    (void)direction; (void)in; (void)out_cap; (void)flags;
    for (pass = 0; pass < 2 * n; pass++) {
        vf_xor_inplace(chunk, *in_len, key);
        /* Launder the pointer: the compiler can no longer tell that the next pass works on
         * the bytes this one wrote, so it can neither fold the passes (x ^ k ^ k == x) nor
         * drop one. Every pass reads and writes the whole chunk. (A "memory" clobber would
         * do too, but makes gcc spill the kernel's words to the stack on every step.) */
        __asm__ volatile("" : "+r"(chunk));
    }
    return (ssize_t)*in_len;
}

/* ---- compress / decompress ------------------------------------------------------------- */

/* deflate never gets less output room than this. zlib completes a flush only when a call
 * returns with output room left; a tiny out_cap could end every call full, and each new
 * call would then start another flush marker, forever. Smaller out_caps go through the
 * direction's spill buffer instead. */
#define VF_Z_SPILL 64

struct vf_zdir {
    z_stream zs;
    int inflating;            /* this direction decompresses, else it compresses */
    int ready;                /* zs is initialised: needs deflateEnd / inflateEnd */
    int flushing;             /* deflate: the last call filled the output mid-flush */
    int flush;                /* deflate: that flush (Z_SYNC_FLUSH or Z_FINISH) */
    int ended;                /* Z_STREAM_END: the raw deflate stream is complete */
    size_t spill_at, spill_len;
    uint8_t spill[VF_Z_SPILL];
};

struct vf_zflow {
    struct vf_zdir dir[2];    /* PIPES_UP, PIPES_DOWN */
};

static inline uInt vf_z_clamp(size_t n)
{
    return n > UINT_MAX ? UINT_MAX : (uInt)n;
}

static void vf_z_despawn(void *ctx)
{
    struct vf_zflow *z = ctx;
    int d;
    for (d = 0; d < 2; d++) {
        struct vf_zdir *x = &z->dir[d];
        if (x->ready && x->inflating)
            inflateEnd(&x->zs);
        else if (x->ready)
            deflateEnd(&x->zs);
    }
    free(z);
}

/* level = params & 0xf: 0 is zlib's default, 1..9 the level (larger values count as 9). */
static void *vf_z_spawn(uint32_t params, int inflate_up)
{
    struct vf_zflow *z = calloc(1, sizeof *z);   /* zalloc/zfree NULL: zlib's malloc */
    int level = (int)(params & 0xf), d, rc;
    if (z == NULL)
        return NULL;
    level = level == 0 ? Z_DEFAULT_COMPRESSION : level > 9 ? 9 : level;
    for (d = 0; d < 2; d++) {
        struct vf_zdir *x = &z->dir[d];
        x->inflating = (d == PIPES_UP) == inflate_up;
        /* windowBits -15: raw deflate, no zlib header or checksum (TCP has its own) */
        rc = x->inflating ? inflateInit2(&x->zs, -MAX_WBITS)
                          : deflateInit2(&x->zs, level, Z_DEFLATED, -MAX_WBITS, 8,
                                         Z_DEFAULT_STRATEGY);
        if (rc != Z_OK) {
            vf_z_despawn(z);
            return NULL;
        }
        x->ready = 1;
    }
    return z;
}

static void *vf_compress_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    (void)flow;
    return vf_z_spawn(params, 0);
}

static void *vf_decompress_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    (void)flow;
    return vf_z_spawn(params, 1);
}

static size_t vf_z_unspill(struct vf_zdir *x, uint8_t *out, size_t out_cap)
{
    size_t n = x->spill_len < out_cap ? x->spill_len : out_cap;
    memcpy(out, x->spill + x->spill_at, n);
    x->spill_at += n;
    x->spill_len -= n;
    return n;
}

/* Compresses what it is offered and ends with Z_SYNC_FLUSH, so the peer can decompress
 * every byte received so far: interactive traffic is not held back for a fuller block. At
 * EOF it finishes the stream (Z_FINISH). Output beyond out_cap stays in zlib (or in the
 * spill buffer) for the next calls. */
static ssize_t vf_deflate_step(struct vf_zdir *x, const uint8_t *in, size_t *in_len,
                               uint8_t *out, size_t out_cap, int flags)
{
    const uInt offered = vf_z_clamp(*in_len);
    const int eof = flags & PIPES_VF_EOF;
    const int spill = out_cap < VF_Z_SPILL;
    size_t room;
    int rc;

    *in_len = 0;
    if (x->spill_len)
        return (ssize_t)vf_z_unspill(x, out, out_cap);
    if (x->ended)
        return offered ? PIPES_VF_ERROR : 0;   /* input after the FIN: a broken relay */
    if (offered == 0 && !x->flushing && !eof)
        return 0;                              /* nothing new, the last flush completed */
    if (offered == 0 && eof && x->zs.total_in == 0 && !x->flushing) {
        x->ended = 1;                          /* nothing ever sent: send nothing, as an */
        return 0;                              /* unproxied empty direction would */
    }

    room = spill ? VF_Z_SPILL : out_cap;
    x->zs.next_in = in;
    x->zs.avail_in = offered;
    x->zs.next_out = spill ? x->spill : out;
    x->zs.avail_out = vf_z_clamp(room);
    /* A flush that filled the output is completed with the same flush parameter, as zlib
     * asks, even if EOF came meanwhile: the next call finishes. */
    if (!x->flushing)
        x->flush = eof ? Z_FINISH : Z_SYNC_FLUSH;
    rc = deflate(&x->zs, x->flush);
    if (rc == Z_STREAM_ERROR)
        return PIPES_VF_ERROR;
    /* Z_BUF_ERROR only means there was nothing to do. */
    *in_len = offered - x->zs.avail_in;
    x->flushing = x->zs.avail_out == 0;
    x->ended = rc == Z_STREAM_END;
    if (spill) {
        x->spill_at = 0;
        x->spill_len = VF_Z_SPILL - x->zs.avail_out;
        return (ssize_t)vf_z_unspill(x, out, out_cap);
    }
    return (ssize_t)(room - x->zs.avail_out);
}

/* Decompresses at most out_cap bytes per call; zlib keeps its state and the unconsumed
 * input stays with the relay, so a small compressed input cannot blow up memory. */
static ssize_t vf_inflate_step(struct vf_zdir *x, const uint8_t *in, size_t *in_len,
                               uint8_t *out, size_t out_cap, int flags)
{
    const uInt offered = vf_z_clamp(*in_len);
    const uInt room = vf_z_clamp(out_cap);
    int rc;

    *in_len = 0;
    if (x->ended)
        return offered ? PIPES_VF_ERROR : 0;   /* bytes after the end of the stream */
    x->zs.next_in = in;
    x->zs.avail_in = offered;
    x->zs.next_out = out;
    x->zs.avail_out = room;
    rc = inflate(&x->zs, Z_SYNC_FLUSH);
    *in_len = offered - x->zs.avail_in;
    if (rc == Z_STREAM_END) {
        x->ended = 1;
        if (x->zs.avail_in)
            return PIPES_VF_ERROR;             /* bytes after the end of the stream */
    } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        return PIPES_VF_ERROR;                 /* corrupt data, out of memory */
    }
    /* inflate stops short of out_cap only when it has no input left: at EOF no more will
     * come, so a stream that has not ended is truncated. */
    if ((flags & PIPES_VF_EOF) && !x->ended && x->zs.avail_out && x->zs.total_in)
        return PIPES_VF_ERROR;                 /* (no bytes at all: an empty direction) */
    return (ssize_t)(room - x->zs.avail_out);
}

static ssize_t vf_z_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                            uint8_t *out, size_t out_cap, int flags)
{
    struct vf_zdir *x;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    x = &((struct vf_zflow *)ctx)->dir[direction];
    return x->inflating ? vf_inflate_step(x, in, in_len, out, out_cap, flags)
                        : vf_deflate_step(x, in, in_len, out, out_cap, flags);
}

/* ---- dpi ------------------------------------------------------------------------------- */

#define VF_DPI_MAX_PATTERNS 1024
#define VF_DPI_MAX_PATTERN_LEN 255
#define VF_DPI_MAX_ENTRIES (8u << 20)   /* transition table: 8 Mi entries, 32 MiB */

/* An Aho-Corasick automaton compiled to a DFA. Bytes that occur in no pattern share class
 * 0, every other byte value has a class of its own, so a row of the transition table has
 * `nclasses` entries instead of 256 (a few dozen for text patterns: the table of 100
 * patterns stays in cache). Entries are row offsets (state * nclasses), which saves a
 * multiplication per byte. Every transition into a state where some pattern ends leads to
 * `sink`, which never leaves: a scan needs no per-byte match test, only a look at the final
 * state. Immutable once built; shared by the flows spawned while it was current. */
struct vf_dpi_set {
    unsigned refs;             /* the current-set slot + one per flow; under vf_state_lock */
    uint32_t nclasses;
    uint32_t sink;             /* row offset of the match state */
    uint16_t cls[256];         /* byte -> class (all 256 byte values may occur) */
    uint32_t *next;            /* [row + class] -> row of the next state; row 0 is the root */
};

struct vf_dpi_flow {
    struct vf_dpi_set *set;    /* NULL: no patterns when the flow started, forward all */
    uint32_t row[2];           /* automaton state per direction, carried across chunks */
};

static struct vf_dpi_set *vf_dpi_current;   /* under vf_state_lock */
static uint64_t vf_dpi_flows_blocked;
static uint64_t vf_dpi_bytes_scanned;

enum { VF_DPI_OK = 0, VF_DPI_TOO_LARGE = 1, VF_DPI_NO_MEMORY = 2 };

static void vf_dpi_free(struct vf_dpi_set *set)
{
    if (set != NULL) {
        free(set->next);
        free(set);
    }
}

/* Drops one reference; the last one frees the set. */
static void vf_dpi_release(struct vf_dpi_set *set)
{
    int last;
    if (set == NULL)
        return;
    pthread_mutex_lock(&vf_state_lock);
    last = --set->refs == 0;
    pthread_mutex_unlock(&vf_state_lock);
    if (last)
        vf_dpi_free(set);
}

/* Builds the automaton of n patterns stored back to back in `bytes` (lengths in `lens`,
 * each 1..255: the caller checks). VF_DPI_TOO_LARGE if the table could exceed
 * VF_DPI_MAX_ENTRIES: (pattern bytes + 2) states x classes. */
static int vf_dpi_build(const uint8_t *bytes, const uint32_t *lens, size_t n,
                        struct vf_dpi_set **result)
{
    struct vf_dpi_set *set;
    uint8_t seen[256] = {0}, *ends = NULL;
    uint32_t *fail = NULL, *queue = NULL, *next;
    size_t total = 0, max_states, nstates = 1, head = 0, tail = 0, i, j, s, t;
    size_t at;
    uint32_t nc = 1, c;
    int rc = VF_DPI_NO_MEMORY;

    for (i = 0; i < n; i++)
        total += lens[i];
    for (i = 0; i < total; i++)
        seen[bytes[i]] = 1;
    set = calloc(1, sizeof *set);
    if (set == NULL)
        return VF_DPI_NO_MEMORY;
    for (i = 0; i < 256; i++)
        set->cls[i] = seen[i] ? (uint16_t)nc++ : 0;
    set->nclasses = nc;
    max_states = total + 2;   /* the root, at most one state per pattern byte, the sink */
    if (max_states > VF_DPI_MAX_ENTRIES / nc) {
        vf_dpi_free(set);
        return VF_DPI_TOO_LARGE;
    }
    next = set->next = malloc(max_states * nc * sizeof *next);
    ends = calloc(max_states, 1);
    fail = malloc(max_states * sizeof *fail);
    queue = malloc(max_states * sizeof *queue);
    if (next == NULL || ends == NULL || fail == NULL || queue == NULL)
        goto out;
    memset(next, 0xff, max_states * nc * sizeof *next);   /* UINT32_MAX: no edge yet */

    /* The trie: states are numbers here; rows come at the end. */
    for (i = 0, at = 0; i < n; at += lens[i], i++) {
        s = 0;
        for (j = 0; j < lens[i]; j++) {
            uint32_t *edge = &next[s * nc + set->cls[bytes[at + j]]];
            if (*edge == UINT32_MAX)
                *edge = (uint32_t)nstates++;
            s = *edge;
        }
        ends[s] = 1;
    }

    /* Failure links breadth first, turning the trie into a DFA: a missing edge of s is the
     * edge of its failure state, whose row is complete (it is shallower, popped before). */
    for (c = 0; c < nc; c++) {
        t = next[c];
        if (t == UINT32_MAX) {
            next[c] = 0;
        } else {
            fail[t] = 0;
            queue[tail++] = (uint32_t)t;
        }
    }
    while (head < tail) {
        s = queue[head++];
        ends[s] |= ends[fail[s]];    /* a pattern that is a suffix of this one ends here too */
        for (c = 0; c < nc; c++) {
            uint32_t *edge = &next[s * nc + c];
            uint32_t via_fail = next[fail[s] * nc + c];
            if (*edge == UINT32_MAX) {
                *edge = via_fail;
            } else {
                fail[*edge] = via_fail;
                queue[tail++] = *edge;
            }
        }
    }

    /* Redirect every transition into a match to the sink (state nstates), then turn state
     * numbers into row offsets. */
    for (c = 0; c < nc; c++)
        next[nstates * nc + c] = (uint32_t)nstates;
    for (i = 0; i < nstates * nc; i++)
        if (ends[next[i]])
            next[i] = (uint32_t)nstates;
    nstates++;
    for (i = 0; i < nstates * nc; i++)
        next[i] *= nc;
    set->sink = (uint32_t)((nstates - 1) * nc);
    /* Shared prefixes leave rows unused at the end: give them back. */
    set->next = realloc(next, nstates * nc * sizeof *next);
    if (set->next == NULL)
        set->next = next;
    set->refs = 1;
    *result = set;
    set = NULL;
    rc = VF_DPI_OK;
out:
    free(ends);
    free(fail);
    free(queue);
    vf_dpi_free(set);
    return rc;
}

/* Makes `set` (or NULL: no patterns) the one new flows get. Flows spawned earlier keep
 * theirs until despawn: each holds a reference. */
static void vf_dpi_install(struct vf_dpi_set *set)
{
    struct vf_dpi_set *old;
    pthread_mutex_lock(&vf_state_lock);
    old = vf_dpi_current;
    vf_dpi_current = set;
    pthread_mutex_unlock(&vf_state_lock);
    vf_dpi_release(old);
}

static void *vf_dpi_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    struct vf_dpi_flow *f = calloc(1, sizeof *f);   /* both directions at the root, row 0 */
    (void)params; (void)flow;
    if (f == NULL)
        return NULL;
    pthread_mutex_lock(&vf_state_lock);
    f->set = vf_dpi_current;
    if (f->set != NULL)
        f->set->refs++;
    pthread_mutex_unlock(&vf_state_lock);
    return f;
}

static ssize_t vf_dpi_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                              uint8_t *out, size_t out_cap, int flags)
{
    struct vf_dpi_flow *f = ctx;
    const struct vf_dpi_set *set = f->set;
    const size_t n = *in_len;
    (void)out; (void)out_cap; (void)flags;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    if (set != NULL) {
        const uint32_t *next = set->next;
        const uint16_t *cls = set->cls;
        uint32_t row = f->row[direction];
        size_t i;
        for (i = 0; i < n; i++)
            row = next[row + cls[in[i]]];
        f->row[direction] = row;
        vf_dpi_bytes_scanned += n;
        if (row == set->sink) {
            vf_dpi_flows_blocked++;
            return PIPES_VF_RESET;
        }
    }
    return (ssize_t)n;
}

static void vf_dpi_despawn(void *ctx)
{
    struct vf_dpi_flow *f = ctx;
    vf_dpi_release(f->set);
    free(f);
}

/* ---- count ----------------------------------------------------------------------------- */

#define VF_COUNT_SLOTS 4096   /* a power of two */

/* One client prefix. A flow's context points at its entry, so process adds its bytes with
 * no lookup. Entries are never moved or removed while flows live. */
struct vf_count_entry {
    uint8_t prefix[16];       /* the client address with the host bits cleared */
    uint8_t len;              /* prefix length 1..128; 0: free slot */
    uint64_t flows;           /* spawned */
    uint64_t active;          /* spawned - despawned */
    uint64_t bytes[2];        /* PIPES_UP, PIPES_DOWN */
};

/* Open addressing, linear probing; when every slot holds another prefix, flows go to
 * vf_count_other (whose `flows` is thus the number of flows the table had no room for). */
static struct vf_count_entry vf_count_table[VF_COUNT_SLOTS];
static struct vf_count_entry vf_count_other;
static uint64_t vf_count_live;   /* flows holding an entry: the table must stay put */

static void vf_mask_prefix(uint8_t prefix[16], const uint8_t addr[16], unsigned len)
{
    unsigned i;
    for (i = 0; i < 16; i++) {
        unsigned bits = len > 8 * i ? len - 8 * i : 0;
        prefix[i] = bits >= 8 ? addr[i] : addr[i] & (uint8_t)(0xff00 >> bits);
    }
}

static uint32_t vf_count_hash(const uint8_t prefix[16], unsigned len)
{
    uint64_t a, b, h;
    memcpy(&a, prefix, 8);
    memcpy(&b, prefix + 8, 8);
    h = a ^ (b * 0x9e3779b97f4a7c15ULL) ^ len;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;   /* splitmix64's finaliser */
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
    return (uint32_t)(h ^ (h >> 31));
}

/* The entry of (prefix, len), claimed if new; NULL if the table is full. Under the lock. */
static struct vf_count_entry *vf_count_find(const uint8_t prefix[16], unsigned len)
{
    uint32_t i = vf_count_hash(prefix, len) & (VF_COUNT_SLOTS - 1), probes;
    for (probes = 0; probes < VF_COUNT_SLOTS; probes++, i = (i + 1) & (VF_COUNT_SLOTS - 1)) {
        struct vf_count_entry *e = &vf_count_table[i];
        if (e->len == 0) {
            memcpy(e->prefix, prefix, 16);
            e->len = (uint8_t)len;
            return e;
        }
        if (e->len == len && memcmp(e->prefix, prefix, 16) == 0)
            return e;
    }
    return NULL;
}

/* prefix length = params & 0xff: 0 means 64, more than 128 means 128. */
static void *vf_count_spawn(uint32_t params, const struct pipes_flow_info *flow)
{
    unsigned len = params & 0xff;
    uint8_t prefix[16];
    struct vf_count_entry *e;
    len = len == 0 ? 64 : len > 128 ? 128 : len;
    vf_mask_prefix(prefix, flow->client, len);
    pthread_mutex_lock(&vf_state_lock);
    e = vf_count_find(prefix, len);
    if (e == NULL)
        e = &vf_count_other;
    e->flows++;
    e->active++;
    vf_count_live++;
    pthread_mutex_unlock(&vf_state_lock);
    return e;
}

static ssize_t vf_count_process(void *ctx, int direction, const uint8_t *in, size_t *in_len,
                                uint8_t *out, size_t out_cap, int flags)
{
    (void)in; (void)out; (void)out_cap; (void)flags;
    if (direction != PIPES_UP && direction != PIPES_DOWN)
        return PIPES_VF_ERROR;
    ((struct vf_count_entry *)ctx)->bytes[direction] += *in_len;
    return (ssize_t)*in_len;
}

static void vf_count_despawn(void *ctx)
{
    pthread_mutex_lock(&vf_state_lock);
    ((struct vf_count_entry *)ctx)->active--;
    vf_count_live--;
    pthread_mutex_unlock(&vf_state_lock);
}

/* For Python: a copy of the table and of the "other" entry, consistent under the lock. */
static void vf_count_copy(struct vf_count_entry *table, struct vf_count_entry *other)
{
    pthread_mutex_lock(&vf_state_lock);
    memcpy(table, vf_count_table, sizeof vf_count_table);
    *other = vf_count_other;
    pthread_mutex_unlock(&vf_state_lock);
}

/* For Python (tests): forgets every prefix; -1 while flows hold entries. */
static int vf_count_clear(void)
{
    int rc = -1;
    pthread_mutex_lock(&vf_state_lock);
    if (vf_count_live == 0) {
        memset(vf_count_table, 0, sizeof vf_count_table);
        memset(&vf_count_other, 0, sizeof vf_count_other);
        rc = 0;
    }
    pthread_mutex_unlock(&vf_state_lock);
    return rc;
}

/* ---- the descriptors -------------------------------------------------------------------- */

/* Same layout as a module's all_funcs: ended by an entry whose name is NULL. */
static const struct pipes_func_desc vf_builtin_funcs[] = {
    { .id = 1, .name = "xor", .flags = PIPES_VF_INPLACE,
      .description = "xors every byte with the key params & 0xff, both directions",
      .spawn = vf_params_spawn, .process = vf_xor_process },
    { .id = 2, .name = "xor-passes", .flags = PIPES_VF_INPLACE,
      .description = "2n xor passes per chunk, net identity (n = params & 0xff): "
                     "a per-byte cost model",
      .spawn = vf_params_spawn, .process = vf_xor_passes_process },
    { .id = 3, .name = "compress", .flags = 0,
      .description = "up: raw deflate, flushed per read (level params & 0xf); "
                     "down: inflate",
      .spawn = vf_compress_spawn, .process = vf_z_process, .despawn = vf_z_despawn },
    { .id = 4, .name = "decompress", .flags = 0,
      .description = "up: inflate; down: raw deflate (level params & 0xf): "
                     "the peer of compress",
      .spawn = vf_decompress_spawn, .process = vf_z_process, .despawn = vf_z_despawn },
    { .id = 7, .name = "dpi", .flags = PIPES_VF_INPLACE,
      .description = "resets a flow carrying any configured pattern, either direction",
      .spawn = vf_dpi_spawn, .process = vf_dpi_process, .despawn = vf_dpi_despawn },
    { .id = 8, .name = "count", .flags = PIPES_VF_INPLACE,
      .description = "counts flows and bytes per client prefix "
                     "(length params & 0xff, 0: /64)",
      .spawn = vf_count_spawn, .process = vf_count_process, .despawn = vf_count_despawn },
    { 0 }
};

#endif

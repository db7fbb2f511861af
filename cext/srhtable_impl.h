/*
 * Shared-memory SRH table: memory layout, atomics and the seqlock, in C.
 *
 * cext/srhtable.pyx holds the table logic and the Python API; this header only declares
 * the bytes every process agrees on and the few operations whose memory ordering matters.
 * All processes run on one host, so integers are in native byte order.
 *
 * Segment (posix shared memory "/srv6pipes-<name>-srh"):
 *
 *   offset 0                      struct srht_header     (256 bytes)
 *   offset 256                    struct srht_entry[nslots]   (64 bytes each: metadata)
 *   offset 256 + 64 * nslots      uint8_t srh[nslots][srh_max] (SRH bytes of slot i)
 *
 * Slot i is entries[i] plus srh[i]; entries[i].seq guards both. Metadata and SRH bytes are
 * kept apart so that a probe window (8 consecutive slots) is 512 contiguous bytes: a
 * lookup touches one or two cache-line runs, plus the one SRH it returns.
 *
 * Seqlock (any number of readers, H.-J. Boehm, "Can seqlocks get along with programming
 * language memory models?", MSPC 2012, figure 6), with writers that claim a slot first:
 *   writer: s = seq when the slot was chosen (even); claim: CAS seq s -> s + 1 (odd), which
 *           fails if any other writer wrote or is writing the slot since it was chosen (the
 *           writer then chooses again); write the slot; seq = s + 2 (release)
 *   reader: s1 = seq (acquire); if odd, retry; copy the slot; acquire fence;
 *           s2 = seq (relaxed); the copy is consistent iff s1 == s2.
 * A torn copy is thrown away, so the reader clamps lengths before using them. Several
 * writers (one capture process per CPU) may insert at once: the claim keeps any two of
 * them from writing one slot, and the counters are atomic additions.
 */
#ifndef SRV6PIPES_SRHTABLE_IMPL_H
#define SRV6PIPES_SRHTABLE_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define SRHT_MAGIC 0x5448525336565253ULL /* "SRV6SRHT" read as a little-endian uint64 */
#define SRHT_VERSION 1u
#define SRHT_HEADER_SIZE 256u
#define SRHT_ENTRY_SIZE 64u
#define SRHT_SRH_MAX 1024u
#define SRHT_PROBE 8u
#define SRHT_KEY_SIZE 36u
#define SRHT_NCOUNTERS 16u

/* header.state */
#define SRHT_STATE_LIVE 0u
#define SRHT_STATE_RETIRED 1u /* a newer table of the same name replaced this one */

struct srht_header {
    uint64_t magic;          /*   0: SRHT_MAGIC, stored last (release) by create() */
    uint32_t version;        /*   8: SRHT_VERSION */
    uint32_t header_size;    /*  12: SRHT_HEADER_SIZE */
    uint32_t nslots;         /*  16: power of two */
    uint32_t slot_size;      /*  20: SRHT_ENTRY_SIZE, bytes of one metadata entry */
    uint32_t srh_max;        /*  24: SRHT_SRH_MAX, bytes of SRH storage per slot */
    uint32_t probe;          /*  28: SRHT_PROBE, slots in a probe window */
    uint32_t ttl_ms;         /*  32: entries older than this count as empty */
    uint32_t state;          /*  36: SRHT_STATE_* (atomic) */
    uint64_t hash_seed;      /*  40: random per table: colliding keys cannot be chosen ahead */
    uint64_t total_size;     /*  48: bytes of the whole segment */
    uint32_t writer_pid;     /*  56 */
    uint32_t reserved0;      /*  60 */
    /* 64: writer counters, relaxed atomic additions; see COUNTERS in srhtable.pyx */
    uint64_t counters[SRHT_NCOUNTERS];
    uint8_t reserved1[SRHT_HEADER_SIZE - 64 - 8 * SRHT_NCOUNTERS];
};

struct srht_entry {
    uint32_t seq;                /*  0: seqlock, odd while the writer is changing the slot */
    uint16_t srh_len;            /*  4: bytes used in srh[i] */
    uint8_t orig_segments_left;  /*  6: segments-left of the SYN as it reached this proxy */
    uint8_t reserved0;           /*  7 */
    uint64_t inserted_at_ms;     /*  8: CLOCK_MONOTONIC ms; 0 = slot never used */
    /* 16: the key, SRHT_KEY_SIZE bytes, compared with memcmp */
    uint8_t client_addr[16];     /* 16 */
    uint8_t dest_addr[16];       /* 32: the SRH's final destination */
    uint16_t client_port;        /* 48 */
    uint16_t dest_port;          /* 50 */
    uint8_t reserved1[12];       /* 52 */
};

struct srht_key {
    uint8_t client_addr[16];
    uint8_t dest_addr[16];
    uint16_t client_port;
    uint16_t dest_port;
};

_Static_assert(sizeof(struct srht_header) == SRHT_HEADER_SIZE, "srht_header size");
_Static_assert(offsetof(struct srht_header, counters) == 64, "srht_header counters offset");
_Static_assert(sizeof(struct srht_entry) == SRHT_ENTRY_SIZE, "srht_entry size");
_Static_assert(offsetof(struct srht_entry, client_addr) == 16, "srht_entry key offset");
_Static_assert(sizeof(struct srht_key) == SRHT_KEY_SIZE, "srht_key size");

static inline const void *srht_entry_key(const struct srht_entry *e) { return e->client_addr; }

/* ---- time -------------------------------------------------------------------------- */

/* CLOCK_MONOTONIC is system wide: values from different processes compare (as long as they
 * share a time namespace, which processes of one pipesd do). Never 0 on a running system. */
static inline uint64_t srht_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u + 1u;
}

/* ---- hash ------------------------------------------------------------------------- */

static inline uint64_t srht_mix64(uint64_t x)
{
    /* splitmix64 / Stafford variant 13 finaliser: every input bit reaches every output bit */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t srht_hash(const struct srht_key *key, uint64_t seed)
{
    uint64_t words[5] = {0, 0, 0, 0, 0};
    uint64_t h = seed ^ 0x9e3779b97f4a7c15ULL;
    memcpy(words, key, SRHT_KEY_SIZE);
    for (int i = 0; i < 5; i++) {
        h = srht_mix64(h ^ words[i]) + 0x9e3779b97f4a7c15ULL;
    }
    return srht_mix64(h);
}

/* ---- atomics ---------------------------------------------------------------------- */

static inline uint32_t srht_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t srht_load_relaxed_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void srht_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t srht_load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t srht_load_relaxed_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void srht_store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void srht_store_relaxed_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* Writers (capture processes, one per CPU) count concurrently: an atomic addition, relaxed
 * (a counter orders nothing). */
static inline void srht_counter_add(uint64_t *p, uint64_t n)
{
    __atomic_fetch_add(p, n, __ATOMIC_RELAXED);
}

static inline void srht_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* ---- seqlock ---------------------------------------------------------------------- */

/* Writer: the slot's sequence when the writer looks at it, to claim the slot with later
 * (acquire: the writer's reads of the slot come after it). */
static inline uint32_t srht_write_seen(const struct srht_entry *e)
{
    return __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
}

/* Writer: claim slot e, unchanged since srht_write_seen returned `seen`, for writing.
 * Returns 1 and makes seq odd (readers retry) if no writer wrote or is writing it since; 0
 * if one did (or `seen` was odd): the caller chooses its slot again. The acquire-release
 * exchange orders the writer's earlier reads of the slot before the claim and its later
 * writes after it. */
static inline int srht_write_claim(struct srht_entry *e, uint32_t seen)
{
    if (seen & 1u)
        return 0;
    if (!__atomic_compare_exchange_n(&e->seq, &seen, seen + 1u, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED))
        return 0;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* as in Boehm's writer: odd seq before any data */
    return 1;
}

/* Writes one claimed slot (srht_write_claim(e, seen) returned 1) and releases it.
 * srh_len <= SRHT_SRH_MAX, checked by the caller. */
static inline void srht_write_slot(struct srht_entry *e, uint32_t seen, uint8_t *srh_area,
                                   const struct srht_key *key, uint8_t orig_segments_left,
                                   const uint8_t *srh, uint16_t srh_len, uint64_t now_ms)
{
    memcpy(e->client_addr, key, SRHT_KEY_SIZE);
    e->orig_segments_left = orig_segments_left;
    e->srh_len = srh_len;
    __atomic_store_n(&e->inserted_at_ms, now_ms, __ATOMIC_RELAXED); /* writers scan it racily */
    memcpy(srh_area, srh, srh_len);
    __atomic_store_n(&e->seq, seen + 2u, __ATOMIC_RELEASE); /* even: the data stores happen before */
}

/* Reader: a consistent copy of slot e's metadata into *out and, when the key matches, of its
 * SRH bytes into srh_out (SRHT_SRH_MAX bytes). Returns 1 if the key matched, 0 if not, -1 if
 * the writer kept the slot busy for max_tries attempts (the caller treats it as a miss). */
static inline int srht_read_slot(const struct srht_entry *e, const uint8_t *srh_area,
                                 const struct srht_key *key, struct srht_entry *out,
                                 uint8_t *srh_out, int max_tries, int *retries)
{
    for (int attempt = 0; attempt < max_tries; attempt++) {
        uint32_t s1 = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1u) {
            (*retries)++;
            srht_cpu_relax();
            continue;
        }
        /* Racy copies by design: a concurrent write makes s2 != s1 and the copy is dropped.
         * The compiler cannot move them across the acquire load above or the fence below. */
        memcpy(out, e, sizeof(*out));
        int match = out->inserted_at_ms != 0 && memcmp(out->client_addr, key, SRHT_KEY_SIZE) == 0;
        if (match) {
            size_t n = out->srh_len;
            if (n > SRHT_SRH_MAX)
                n = SRHT_SRH_MAX; /* torn length: clamp, the seq check rejects the copy */
            memcpy(srh_out, srh_area, n);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint32_t s2 = __atomic_load_n(&e->seq, __ATOMIC_RELAXED);
        if (s1 == s2)
            return match;
        (*retries)++;
    }
    return -1;
}

#endif /* SRV6PIPES_SRHTABLE_IMPL_H */

/*
 * The capture's per-SYN fast path: the common shape of a queued SYN, parsed in C.
 *
 * Why: the capture process handles every intercepted SYN before the kernel may go on with
 * it, so its per-SYN cost is paid on every short connection. The full parser
 * (pipes/srh.py: find_srh, SRH.parse) is Python and cost about 15 us per SYN here.
 *
 * What is "common": IPv6; an optional hop-by-hop header, destination options, exactly one
 * routing header and it is an SRH (type 4) without TLVs; then a TCP header whose flags say
 * SYN without ACK. The SRH passes the same checks SRH.parse makes (hdrlen large enough for
 * last_entry, at most SYN_MAX_SEGMENTS segments, segments_left <= last_entry), and it must fit
 * a table slot. Everything else (no SRH, TLVs, fragments, another routing type, a truncated
 * or inconsistent chain, not a SYN, an SRH too large for the table) returns SYN_SLOW and
 * nothing is decided here: the Python path parses it again, counts it and logs it, so
 * the two parsers cannot disagree on anything but speed. The property tests in
 * tests/unit/test_synparse.py check that against find_srh.
 */
#ifndef SRV6PIPES_SYNPARSE_H
#define SRV6PIPES_SYNPARSE_H

#include <stddef.h>
#include <stdint.h>

#define SYN_FAST 0
#define SYN_SLOW 1

#define SYN_IPV6_HEADER 40u
#define SYN_MAX_EXTENSION_HEADERS 8   /* srh.MAX_EXTENSION_HEADERS */
#define SYN_MAX_SEGMENTS 64           /* srh.MAX_SEGMENTS */
#define SYN_IPPROTO_HOPOPTS 0
#define SYN_IPPROTO_TCP 6
#define SYN_IPPROTO_ROUTING 43
#define SYN_IPPROTO_DSTOPTS 60
#define SYN_ROUTING_TYPE_SRH 4
#define SYN_TCP_SYN 0x02
#define SYN_TCP_ACK 0x10

struct syn_info {
    const uint8_t *client;      /* IPv6 source address (16 bytes, inside the packet) */
    const uint8_t *destination; /* the final destination: segments[0] of the SRH */
    uint16_t client_port;       /* host order */
    uint16_t dest_port;
    const uint8_t *srh;         /* the SRH as on the wire */
    uint16_t srh_len;
    uint8_t segments_left;      /* as the SYN carried it */
};

static inline int syn_parse_fast(const uint8_t *p, size_t len, size_t srh_max,
                                 struct syn_info *out)
{
    size_t end, offset = SYN_IPV6_HEADER, header_end, srh_len = 0, count;
    const uint8_t *srh = NULL;
    uint8_t next_header;
    int n;

    if (len < SYN_IPV6_HEADER || (p[0] >> 4) != 6)
        return SYN_SLOW;
    end = SYN_IPV6_HEADER + (((size_t)p[4] << 8) | p[5]);
    if (end > len)
        return SYN_SLOW;
    next_header = p[6];
    for (n = 0; n < SYN_MAX_EXTENSION_HEADERS; n++) {
        if (next_header != SYN_IPPROTO_HOPOPTS && next_header != SYN_IPPROTO_ROUTING &&
            next_header != SYN_IPPROTO_DSTOPTS)
            break;
        if (next_header == SYN_IPPROTO_HOPOPTS && offset != SYN_IPV6_HEADER)
            return SYN_SLOW;
        if (offset + 8 > end)
            return SYN_SLOW;
        header_end = offset + ((size_t)p[offset + 1] + 1) * 8;
        if (header_end > end)
            return SYN_SLOW;
        if (next_header == SYN_IPPROTO_ROUTING) {
            if (srh != NULL || p[offset + 2] != SYN_ROUTING_TYPE_SRH)
                return SYN_SLOW;
            srh = p + offset;
            srh_len = header_end - offset;
        }
        next_header = p[offset];
        offset = header_end;
    }
    /* An extension header still next means more than the limit: SYN_SLOW too. */
    if (next_header != SYN_IPPROTO_TCP || srh == NULL || offset + 14 > end)
        return SYN_SLOW;
    if ((p[offset + 13] & (SYN_TCP_SYN | SYN_TCP_ACK)) != SYN_TCP_SYN)
        return SYN_SLOW;

    /* srh[1] hdrlen, srh[3] segments_left, srh[4] last_entry */
    count = (size_t)srh[4] + 1;
    if (srh[1] < 2 * count || count > SYN_MAX_SEGMENTS || srh[3] > srh[4])
        return SYN_SLOW;
    if (srh_len != 8 + 16 * count || srh_len > srh_max)
        return SYN_SLOW; /* TLVs (validated by the Python parser) or too large for a slot */

    out->client = p + 8;
    out->destination = srh + 8;
    out->client_port = (uint16_t)((p[offset] << 8) | p[offset + 1]);
    out->dest_port = (uint16_t)((p[offset + 2] << 8) | p[offset + 3]);
    out->srh = srh;
    out->srh_len = (uint16_t)srh_len;
    out->segments_left = srh[3];
    return SYN_FAST;
}

#endif

/*
 * The capture's fast path for SYNs steered by a binding segment (pipes/srhstack.py and
 * pipes/srhhmac.py are the reference; tests/unit/test_synbinding.py checks this against them).
 *
 * Why: with an access router's End.B6 binding every SYN a proxy sees carries two SRHs,
 * the outer one signed with an HMAC TLV; the Python path (find_srh + syn_route) costs tens
 * of microseconds per SYN. Here the shapes the access routers produce are parsed in C;
 * the HMAC itself is computed by the caller (srhtable.pyx, with Python's OpenSSL-backed
 * hmac.digest), the flattening is done here.
 *
 * Shapes accepted (anything else is SYN_SLOW and left to the Python path, unchanged):
 *   - one SRH whose only TLV is an HMAC TLV, as Linux puts it: the last 40 bytes, type 5,
 *     length 38;
 *   - two SRHs back to back (End.B6): the outer one without TLVs or with that HMAC TLV,
 *     the inner one (the client's) without TLVs;
 * behind an optional hop-by-hop header, before an optional destination options header,
 * then TCP with SYN set and ACK clear; every SRH passing the checks SRH.parse makes. A
 * single SRH without TLVs is synparse.h's shape, not this one.
 */
#ifndef SRV6PIPES_SYNBINDING_H
#define SRV6PIPES_SYNBINDING_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "synparse.h"

#define SYN_HMAC_TLV 5
#define SYN_HMAC_TLV_LEN 38
#define SYN_HMAC_TLV_BYTES 40      /* type, length, reserved (2), key id (4), HMAC (32) */
#define SYN_HMAC_FLAG 0x08         /* SR6_FLAG1_HMAC */

struct syn_binding {
    const uint8_t *client;      /* IPv6 source address (16 bytes) */
    uint16_t client_port;
    uint16_t dest_port;
    const uint8_t *outer;       /* the SRH naming this proxy (the policy's, if stacked) */
    size_t outer_len;
    const uint8_t *inner;       /* the client's SRH under a binding, or NULL */
    size_t inner_len;
    const uint8_t *hmac;        /* the outer SRH's HMAC TLV (40 bytes), or NULL */
};

/* SRH.parse's consistency checks; returns the segment count or 0. */
static inline size_t syn_srh_count(const uint8_t *srh, size_t srh_len)
{
    size_t count = (size_t)srh[4] + 1;
    if (srh[2] != SYN_ROUTING_TYPE_SRH || srh[1] < 2 * count || count > SYN_MAX_SEGMENTS ||
        srh[3] > srh[4] || srh_len < 8 + 16 * count)
        return 0;
    return count;
}

static inline int syn_parse_binding(const uint8_t *p, size_t len, struct syn_binding *out)
{
    size_t end, offset = SYN_IPV6_HEADER, header_end, count;
    const uint8_t *srh[2] = {NULL, NULL};
    size_t srh_len[2] = {0, 0};
    int n, routing = 0, previous_srh = 0;
    uint8_t next_header;

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
            /* SRHs only; a second one only directly behind the first */
            if (p[offset + 2] != SYN_ROUTING_TYPE_SRH || routing == 2 ||
                (routing == 1 && !previous_srh))
                return SYN_SLOW;
            srh[routing] = p + offset;
            srh_len[routing] = header_end - offset;
            routing++;
            previous_srh = 1;
        } else {
            previous_srh = 0;
        }
        next_header = p[offset];
        offset = header_end;
    }
    if (next_header != SYN_IPPROTO_TCP || routing == 0 || offset + 14 > end)
        return SYN_SLOW;
    if ((p[offset + 13] & (SYN_TCP_SYN | SYN_TCP_ACK)) != SYN_TCP_SYN)
        return SYN_SLOW;

    out->hmac = NULL;
    count = syn_srh_count(srh[0], srh_len[0]);
    if (count == 0)
        return SYN_SLOW;
    if (srh_len[0] == 8 + 16 * count + SYN_HMAC_TLV_BYTES) {
        const uint8_t *tlv = srh[0] + 8 + 16 * count;
        if (tlv[0] != SYN_HMAC_TLV || tlv[1] != SYN_HMAC_TLV_LEN)
            return SYN_SLOW;
        out->hmac = tlv;
    } else if (srh_len[0] != 8 + 16 * count) {
        return SYN_SLOW;  /* other TLVs: the Python path */
    }
    if (routing == 1 && out->hmac == NULL)
        return SYN_SLOW;  /* synparse.h's shape */
    if (routing == 2) {
        count = syn_srh_count(srh[1], srh_len[1]);
        if (count == 0 || srh_len[1] != 8 + 16 * count)
            return SYN_SLOW;
    }
    out->client = p + 8;
    out->client_port = (uint16_t)((p[offset] << 8) | p[offset + 1]);
    out->dest_port = (uint16_t)((p[offset + 2] << 8) | p[offset + 3]);
    out->outer = srh[0];
    out->outer_len = srh_len[0];
    out->inner = srh[1];
    out->inner_len = srh_len[1];
    return SYN_FAST;
}

/*
 * Writes into buf the single SRH the stacked pair means (srhstack.flatten): the client's
 * segments before the binding, the policy's segments without its last one (the BSID),
 * the client's segments after the binding; segments-left on the policy's active segment;
 * flags and tag of the policy (HMAC flag set only when key_id is given); next header of
 * the client's SRH. With key_id >= 0 an HMAC TLV (key id set, HMAC zero) ends the header,
 * for the caller to fill. Returns the length written, or 0 when the pair does not fit
 * together (the policy does not return to the client's active segment, the policy is
 * exhausted, the result is longer than cap or than SYN_MAX_SEGMENTS): then the Python
 * path decides.
 */
static inline size_t syn_flatten(const struct syn_binding *b, uint8_t *buf, size_t cap,
                                 int64_t key_id)
{
    const uint8_t *outer = b->outer, *inner = b->inner;
    size_t outer_count = (size_t)outer[4] + 1, inner_count = (size_t)inner[4] + 1;
    size_t index = inner[3], count = inner_count + outer_count - 2, length, at;

    if (index == 0 || outer[3] == 0 || outer_count < 2 || count > SYN_MAX_SEGMENTS ||
        memcmp(inner + 8 + 16 * index, outer + 8, 16) != 0)
        return 0;
    length = 8 + 16 * count + (key_id >= 0 ? SYN_HMAC_TLV_BYTES : 0);
    if (length > cap)
        return 0;
    buf[0] = inner[0];
    buf[1] = (uint8_t)((length - 8) / 8);
    buf[2] = SYN_ROUTING_TYPE_SRH;
    buf[3] = (uint8_t)(index + outer[3] - 1);
    buf[4] = (uint8_t)(count - 1);
    buf[5] = (uint8_t)((outer[5] & ~SYN_HMAC_FLAG) | (key_id >= 0 ? SYN_HMAC_FLAG : 0));
    buf[6] = outer[6];
    buf[7] = outer[7];
    at = 8;
    memcpy(buf + at, inner + 8, 16 * index);                          /* after the binding */
    at += 16 * index;
    memcpy(buf + at, outer + 8 + 16, 16 * (outer_count - 1));         /* the policy */
    at += 16 * (outer_count - 1);
    memcpy(buf + at, inner + 8 + 16 * (index + 1), 16 * (inner_count - index - 1));
    at += 16 * (inner_count - index - 1);
    if (key_id >= 0) {
        memset(buf + at, 0, SYN_HMAC_TLV_BYTES);
        buf[at] = SYN_HMAC_TLV;
        buf[at + 1] = SYN_HMAC_TLV_LEN;
        buf[at + 4] = (uint8_t)(key_id >> 24);
        buf[at + 5] = (uint8_t)(key_id >> 16);
        buf[at + 6] = (uint8_t)(key_id >> 8);
        buf[at + 7] = (uint8_t)key_id;
    }
    return length;
}

#endif

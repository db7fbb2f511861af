// SPDX-License-Identifier: GPL-2.0-only
/*
 * SYN-cookie connections through a transparent SRv6 proxy: hand their first ACK to the
 * listener. Loaded by srv6pipes.cookies on the ingress (tc clsact) of every interface of
 * the proxy's network namespace; compiled by setup.py (clang -target bpf).
 *
 * Why: pipesd intercepts a connection by TPROXYing its SYN to the transparent listener.
 * Under a SYN flood the listener's SYN queue is full and the kernel answers with a SYN
 * cookie instead of keeping the SYN. The client's ACK then has to find the listener, but
 * it is addressed to our function address, not to the listener, and nft's tproxy cannot
 * tell it from the ACKs of connections we already hold (it looks sockets up by the
 * packet's destination, the function address, while our accepted sockets are bound to
 * the final destination S that the kernel's SRH loop writes in later). So the kernel
 * resets it and the client fails.
 *
 * What this program does, per packet, before netfilter: an IPv6 packet to our locator
 * whose SRH follows the IPv6 header (or two SRHs, a binding's: End.B6 stacks them),
 * carrying a TCP segment with ACK and without SYN or
 * RST, is looked up as the kernel will see it after the SRH loop (client -> S, S being the
 * SRH's last segment). If no connection has that tuple, it is the first ACK of a cookie
 * connection (or garbage): it is assigned to the listener (bpf_sk_assign, as TPROXY does
 * for SYNs), which validates the cookie. Everything else passes untouched; the packet
 * itself is never modified. The connection's SRH is the one the capture recorded from its
 * SYN (the ACK is not queued to the capture: parked there, the client's next segments
 * would overtake it, find no socket either, and be handed to the listener too late).
 *
 * The constants below are placeholders that srv6pipes.cookies patches in the compiled
 * instructions before loading (each must appear exactly once): our locator (value and
 * mask, as two 64-bit halves in the host's byte order) and the listeners' port.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define LOCATOR_HI   0x1111111111111111ULL   /* the patched values are replaced whole; */
#define LOCATOR_LO   0x3333333333333333ULL   /* each locator half is a subset of its  */
#define MASK_HI      0xF1F1F1F1F1F1F1F1ULL   /* mask so the compiler keeps the test    */
#define MASK_LO      0xF3F3F3F3F3F3F3F3ULL
#define LISTEN_PORT  0xA5C3                  /* host order; the code holds htons() of it */

#define IPPROTO_ROUTING_HEADER 43
#define SRH_TYPE 4

struct srh_head {
	__u8 nexthdr, hdrlen, type, segments_left, last_entry, flags;
	__u16 tag;
	struct in6_addr final_destination;   /* segments[0] */
};

/* Half of an address as the CPU loads it from the packet, no byte swap: the patched
 * locator and mask halves are prepared the same way (bytes 0-7 and 8-15 of the address,
 * read in the host's byte order). */
static __always_inline __u64 raw_half(const struct in6_addr *address, int half)
{
	__u64 value;
	__builtin_memcpy(&value, &address->s6_addr[8 * half], 8);
	return value;
}

SEC("tc")
int cookie_ack(struct __sk_buff *skb)
{
	struct ipv6hdr ip6;
	struct srh_head srh;
	struct tcphdr tcp;
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 tcp_offset;

	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;
	/* Offsets from the network header: works whatever the link layer is. */
	if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
		return TC_ACT_OK;
	if (ip6.nexthdr != IPPROTO_ROUTING_HEADER)
		return TC_ACT_OK;
	if ((raw_half(&ip6.daddr, 0) & MASK_HI) != LOCATOR_HI ||
	    (raw_half(&ip6.daddr, 1) & MASK_LO) != LOCATOR_LO)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes_relative(skb, sizeof(ip6), &srh, sizeof(srh), BPF_HDR_START_NET))
		return TC_ACT_OK;
	if (srh.type != SRH_TYPE || srh.hdrlen < 2)
		return TC_ACT_OK;
	tcp_offset = sizeof(ip6) + ((__u32)srh.hdrlen + 1) * 8;
	if (srh.nexthdr == IPPROTO_ROUTING_HEADER) {
		/* A binding segment's End.B6 put its policy SRH in front of the client's: the
		 * final destination is the inner header's last segment, and the kernel's SRH
		 * loop walks both. */
		if (bpf_skb_load_bytes_relative(skb, tcp_offset, &srh, sizeof(srh), BPF_HDR_START_NET))
			return TC_ACT_OK;
		if (srh.type != SRH_TYPE || srh.hdrlen < 2)
			return TC_ACT_OK;
		tcp_offset += ((__u32)srh.hdrlen + 1) * 8;
	}
	if (srh.nexthdr != IPPROTO_TCP)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes_relative(skb, tcp_offset, &tcp, sizeof(tcp), BPF_HDR_START_NET))
		return TC_ACT_OK;
	if (!tcp.ack || tcp.syn || tcp.rst)
		return TC_ACT_OK;

	/* The connection as TCP will see it after the SRH loop: client -> final destination. */
	__builtin_memcpy(tuple.ipv6.saddr, &ip6.saddr, 16);
	__builtin_memcpy(tuple.ipv6.daddr, &srh.final_destination, 16);
	tuple.ipv6.sport = tcp.source;
	tuple.ipv6.dport = tcp.dest;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* A connection, a request or a TIME_WAIT socket owns it: the normal path. (A
		 * wildcard listener of this host on the same port is not ours: go on.) */
		int listener = sk->state == BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		if (!listener)
			return TC_ACT_OK;
	}
	/* Our transparent listener ([::]:LISTEN_PORT, SO_REUSEPORT group). */
	tuple.ipv6.dport = bpf_htons(LISTEN_PORT);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return TC_ACT_OK;
	if (sk->state == BPF_TCP_LISTEN)
		bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";

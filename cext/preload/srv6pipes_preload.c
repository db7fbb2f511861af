/*
 * srv6pipes_preload.so: steers an unmodified program's TCP connections through SRv6Pipes
 * functions without root and without a route (LD_PRELOAD; started by `pipes-run`).
 *
 * pipes-run asks the controller for each server name and writes what it answered to the
 * file named by $SRV6PIPES_ROUTES, one line per name:
 *
 *     NAME ADDRESS SRH_HEX MSS
 *
 * and rewrites it (rename) when it refreshes the bindings. This library wraps two calls:
 *
 *  - getaddrinfo(NAME, ...) answers ADDRESS for a listed NAME, so the program connects to
 *    the address the controller answered for, whatever its own resolver would say;
 *  - connect() of a TCP socket to a listed ADDRESS first sets the SRH on the socket
 *    (IPV6_RTHDR, an unprivileged option) and lowers its MSS by the bytes the access
 *    router's SRH adds (TCP_MAXSEG). If either fails, connect() fails with that errno:
 *    a connection meant for a chain never leaves without it (fail closed).
 *
 * Everything else passes through untouched. The file is read again when its inode or
 * modification time changes (pipes-run replaces it with rename).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>

#ifndef IPV6_RTHDR
#define IPV6_RTHDR 57
#endif

#define MAX_ROUTES 64
#define MAX_NAME 254
#define MAX_SRH 2048 /* 8 + 16 x 127 segments, rounded up */

struct route {
	char name[MAX_NAME];
	struct in6_addr address;
	unsigned char srh[MAX_SRH];
	size_t srh_len;
	int mss;
};

static struct route routes[MAX_ROUTES];
static int route_count;
static ino_t routes_inode;
static struct timespec routes_mtime;
static pthread_mutex_t routes_lock = PTHREAD_MUTEX_INITIALIZER;

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_getaddrinfo)(const char *, const char *, const struct addrinfo *,
			       struct addrinfo **);

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* One line "NAME ADDRESS SRH_HEX MSS" into *r; 0 on success. */
static int parse_line(char *line, struct route *r)
{
	char *save = NULL;
	char *name = strtok_r(line, " \t\n", &save);
	char *address = strtok_r(NULL, " \t\n", &save);
	char *hex = strtok_r(NULL, " \t\n", &save);
	char *mss = strtok_r(NULL, " \t\n", &save);
	size_t hex_len, i;

	if (!name || !address || !hex || !mss || strlen(name) >= MAX_NAME)
		return -1;
	hex_len = strlen(hex);
	if (hex_len % 2 || hex_len / 2 > MAX_SRH)
		return -1;
	if (inet_pton(AF_INET6, address, &r->address) != 1)
		return -1;
	for (i = 0; i < hex_len / 2; i++) {
		int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -1;
		r->srh[i] = (unsigned char)(hi << 4 | lo);
	}
	r->srh_len = hex_len / 2;
	r->mss = atoi(mss);
	strcpy(r->name, name);
	return 0;
}

/* Reads $SRV6PIPES_ROUTES again if it changed. Caller holds routes_lock. */
static void refresh_routes(void)
{
	const char *path = getenv("SRV6PIPES_ROUTES");
	struct stat st;
	char line[MAX_NAME + INET6_ADDRSTRLEN + 2 * MAX_SRH + 32];
	FILE *file;
	int count = 0;

	if (!path || stat(path, &st) != 0)
		return; /* keep what we had: pipes-run may be replacing the file */
	if (st.st_ino == routes_inode && st.st_mtim.tv_sec == routes_mtime.tv_sec &&
	    st.st_mtim.tv_nsec == routes_mtime.tv_nsec)
		return;
	file = fopen(path, "re");
	if (!file)
		return;
	while (count < MAX_ROUTES && fgets(line, sizeof(line), file))
		if (parse_line(line, &routes[count]) == 0)
			count++;
	fclose(file);
	route_count = count;
	routes_inode = st.st_ino;
	routes_mtime = st.st_mtim;
}

static int name_matches(const char *listed, const char *asked)
{
	size_t n = strlen(asked);
	if (n && asked[n - 1] == '.')
		n--; /* a fully qualified name */
	return strlen(listed) == n && strncasecmp(listed, asked, n) == 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
		struct addrinfo **res)
{
	char address[INET6_ADDRSTRLEN] = "";
	struct addrinfo numeric;
	int i;

	if (!real_getaddrinfo)
		real_getaddrinfo = dlsym(RTLD_NEXT, "getaddrinfo");
	if (node) {
		pthread_mutex_lock(&routes_lock);
		refresh_routes();
		for (i = 0; i < route_count; i++)
			if (name_matches(routes[i].name, node)) {
				inet_ntop(AF_INET6, &routes[i].address, address, sizeof(address));
				break;
			}
		pthread_mutex_unlock(&routes_lock);
	}
	if (!address[0])
		return real_getaddrinfo(node, service, hints, res);
	/* A listed name is reached through its chain, which is IPv6: asked for another family,
	 * it has no address (fail closed), rather than the resolver's, without the chain. */
	if (hints && hints->ai_family != AF_UNSPEC && hints->ai_family != AF_INET6)
		return EAI_NONAME;
	/* The controller's answer, through the real resolver's numeric path so the result is
	 * the library's own allocation (freeaddrinfo stays correct). */
	memset(&numeric, 0, sizeof(numeric));
	if (hints)
		numeric = *hints;
	numeric.ai_family = AF_INET6;
	numeric.ai_flags = (numeric.ai_flags | AI_NUMERICHOST) & ~(AI_ADDRCONFIG | AI_V4MAPPED);
	return real_getaddrinfo(address, service, &numeric, res);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
	unsigned char srh[MAX_SRH];
	size_t srh_len = 0;
	int mss = 0, type = 0, found = 0, i;
	socklen_t type_len = sizeof(type);

	if (!real_connect)
		real_connect = dlsym(RTLD_NEXT, "connect");
	if (!addr || len < sizeof(*sin6) || addr->sa_family != AF_INET6)
		return real_connect(fd, addr, len);
	pthread_mutex_lock(&routes_lock);
	refresh_routes();
	for (i = 0; i < route_count; i++)
		if (memcmp(&routes[i].address, &sin6->sin6_addr, sizeof(struct in6_addr)) == 0) {
			memcpy(srh, routes[i].srh, routes[i].srh_len);
			srh_len = routes[i].srh_len;
			mss = routes[i].mss;
			found = 1;
			break;
		}
	pthread_mutex_unlock(&routes_lock);
	/* Only TCP takes the SRH (the socket type is asked only for a listed address). */
	if (found && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 &&
	    type == SOCK_STREAM) {
		if (setsockopt(fd, IPPROTO_IPV6, IPV6_RTHDR, srh, (socklen_t)srh_len) != 0)
			return -1; /* errno from setsockopt: fail closed */
		if (mss > 0 && setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) != 0)
			return -1;
	}
	return real_connect(fd, addr, len);
}

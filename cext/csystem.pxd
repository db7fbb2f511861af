# The system's C declarations the extensions share, declared once (uvloop's includes/ is the
# model): every cext/*.pyx cimports what it needs from here instead of declaring its own
# `cdef extern from "sys/socket.h"`. Declarations only, no code.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct linger:
        int l_onoff
        int l_linger
    int AF_INET6
    int SOCK_STREAM
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int SOL_SOCKET
    int SO_REUSEADDR
    int SO_REUSEPORT
    int SO_LINGER
    int SO_KEEPALIVE
    int SO_ERROR
    int SHUT_WR
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int MSG_MORE
    int socket(int domain, int type, int protocol)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int getsockname(int fd, sockaddr *addr, socklen_t *addrlen)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t length)
    int getsockopt(int fd, int level, int name, void *value, socklen_t *length)
    int bind(int fd, const sockaddr *addr, socklen_t addrlen)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    int shutdown(int fd, int how)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)

cdef extern from "<netinet/in.h>" nogil:
    struct in6_addr:
        pass
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    int IPPROTO_IPV6
    int IPPROTO_TCP
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY
    int TCP_KEEPIDLE
    int TCP_KEEPINTVL
    int TCP_KEEPCNT

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLPRI
        EPOLLERR
        EPOLLHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len,
                   unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        SPLICE_F_MORE
        O_NONBLOCK
        O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)
    ssize_t write(int fd, const void *buf, size_t n)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    enum:
        SIOCATMARK

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec *ts)
    enum:
        CLOCK_MONOTONIC_COARSE


# Linux option numbers (<linux/in6.h>, <linux/tcp.h>, <asm-generic/socket.h>): not every
# libc header defines them. Python code gets them from pipes/system.py, which takes them
# from here through srv6pipes._sockops.SOCKET_OPTIONS.
cdef enum LinuxSocketOption:
    IPV6_RTHDR = 57
    IPV6_TRANSPARENT = 75
    TCP_SAVE_SYN = 27
    TCP_SAVED_SYN = 28
    SO_NETNS_COOKIE = 71

/* delayline: delay, loss and an optional rate cap for the packets of one NFQUEUE queue.
 *
 * A stand-in for netem on kernels built without it (the lab's). bench/lab/linkemu.py puts
 * an ip6tables rule in the receiving end's namespace that queues what arrives on one veth
 * (raw PREROUTING, -i IFACE -j NFQUEUE --queue-num Q) and starts one delayline per rule:
 *
 *     delayline --queue Q --delay-ms 25 --loss-pct 1 [--rate-mbit R] [--limit N]
 *               [--seed S] [--realtime]
 *
 * Per packet, in arrival order:
 *   - with probability loss-pct/100 it is dropped at once (independent draws, like netem's
 *     default loss model), from a seeded generator, so a run can be repeated exactly;
 *   - otherwise it is held and accepted at  departure + delay,  where departure is the
 *     arrival time, or with --rate-mbit the time the previous packet finished serializing
 *     plus this packet's own serialization time (a FIFO link of that rate).
 * Release times never decrease, so packets leave in the order they came: no reordering, and
 * one batch verdict (accept every id up to N) releases everything that is due.
 *
 * Why at ingress (the receiving end) and not at the sender: a locally sent packet held in
 * a queue still counts against its socket's send budget (TCP small queues), which would
 * throttle the sender to a trickle; veth has already orphaned the packet when it arrives.
 *
 * Bounded: the kernel holds the packets (we ask only for their first bytes), at most
 * --limit of them (the queue's maxlen; beyond that the kernel drops them and counts them
 * as queue_dropped); we keep one (id, release time) slot per held packet, --limit slots.
 *
 * Exit: SIGTERM or SIGINT releases every held packet (none is lost by stopping), then
 * prints one line of JSON with the counters to stdout and exits 0. Errors: a message on
 * stderr and exit 1 (bad arguments: 2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <arpa/inet.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libnetfilter_queue/libnetfilter_queue.h>

#define COPY_BYTES 48          /* the IPv6 (or IPv4) header: enough for the packet's length */
#define RECV_BATCH 32          /* messages read before looking again for due packets */
#define LATE_BUCKET_US 100     /* lateness histogram: 100 us buckets ... */
#define LATE_BUCKETS 64        /* ... up to 6.4 ms, the last bucket holds everything later */
#define PEAK_WINDOW_NS 100000000u   /* peak rate: the most packets received in 100 ms */

struct settings {
    unsigned queue;
    double delay_ms, loss_pct, rate_mbit;
    unsigned limit;
    uint64_t seed;
    int realtime;
};

struct held {                  /* one packet the kernel holds for us */
    uint32_t id;
    uint64_t release_ns;
};

struct line {
    struct settings set;
    struct nfq_q_handle *qh;
    struct held *ring;         /* FIFO of held packets, capacity set.limit */
    unsigned head, count;
    uint64_t delay_ns, loss_threshold, last_departure_ns;
    uint64_t rng;
    /* counters, printed at exit */
    uint64_t received, dropped, accepted, overflow, bytes, max_held, enobufs, verdict_errors;
    uint64_t late_hist[LATE_BUCKETS], late_max_ns, late_sum_ns, releases;
    uint64_t window_start_ns, window_packets, peak_window_packets;   /* busiest 100 ms */
    uint64_t verdict_max_ns;   /* the longest batch verdict: the kernel runs the rest of
                                  the released packets' receive path inside it */
};

static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* splitmix64: small, fast, good enough for independent Bernoulli draws. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The packet's length on the wire from its first bytes: IPv6 payload length + 40, or the
 * IPv4 total length. Only the rate cap needs it. */
static unsigned packet_length(const unsigned char *data, int len)
{
    if (len >= 40 && (data[0] >> 4) == 6)
        return 40u + ((unsigned)data[4] << 8 | data[5]);
    if (len >= 20 && (data[0] >> 4) == 4)
        return (unsigned)data[2] << 8 | data[3];
    return len > 0 ? (unsigned)len : 0;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
                     void *arg)
{
    struct line *ln = arg;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    unsigned char *data = NULL;
    (void)msg;
    if (ph == NULL)
        return 0;
    uint32_t id = ntohl(ph->packet_id);
    uint64_t now = now_ns();
    int copied = nfq_get_payload(nfa, &data);
    unsigned length = packet_length(data, copied);
    ln->received++;
    if (now - ln->window_start_ns >= PEAK_WINDOW_NS) {
        ln->window_start_ns = now;
        ln->window_packets = 0;
    }
    if (++ln->window_packets > ln->peak_window_packets)
        ln->peak_window_packets = ln->window_packets;
    if (ln->loss_threshold && next_random(&ln->rng) < ln->loss_threshold) {
        ln->dropped++;
        if (nfq_set_verdict(qh, id, NF_DROP, 0, NULL) < 0)
            ln->verdict_errors++;
        return 0;
    }
    if (ln->count == ln->set.limit) {
        /* Cannot happen while the kernel's maxlen equals our capacity; if it does, say so
         * in the counters rather than grow. */
        ln->overflow++;
        if (nfq_set_verdict(qh, id, NF_DROP, 0, NULL) < 0)
            ln->verdict_errors++;
        return 0;
    }
    uint64_t departure = now;
    if (ln->set.rate_mbit > 0) {
        uint64_t start = now > ln->last_departure_ns ? now : ln->last_departure_ns;
        departure = start + (uint64_t)(length * 8.0 * 1000.0 / ln->set.rate_mbit);
        ln->last_departure_ns = departure;
    }
    struct held *slot = &ln->ring[(ln->head + ln->count) % ln->set.limit];
    slot->id = id;
    slot->release_ns = departure + ln->delay_ns;
    ln->count++;
    ln->bytes += length;
    if (ln->count > ln->max_held)
        ln->max_held = ln->count;
    return 0;
}

/* Accept every held packet due by ``now`` (all of them when ``all``) with one batch
 * verdict: ids grow with arrival and so do release times, so the due ones are a prefix. */
static void release_due(struct line *ln, uint64_t now, int all)
{
    uint32_t last_id = 0;
    unsigned n = 0;
    while (ln->count) {
        struct held *slot = &ln->ring[ln->head];
        if (!all && slot->release_ns > now)
            break;
        if (!all) {
            uint64_t late = now - slot->release_ns;
            unsigned bucket = (unsigned)(late / (LATE_BUCKET_US * 1000u));
            ln->late_hist[bucket < LATE_BUCKETS ? bucket : LATE_BUCKETS - 1]++;
            ln->late_sum_ns += late;
            if (late > ln->late_max_ns)
                ln->late_max_ns = late;
            ln->releases++;
        }
        last_id = slot->id;
        ln->head = (ln->head + 1) % ln->set.limit;
        ln->count--;
        n++;
    }
    if (n) {
        uint64_t t0 = now_ns();
        if (nfq_set_verdict_batch(ln->qh, last_id, NF_ACCEPT) < 0)
            ln->verdict_errors++;
        uint64_t took = now_ns() - t0;
        if (took > ln->verdict_max_ns)
            ln->verdict_max_ns = took;
        ln->accepted += n;
    }
}

/* The kernel's own counters for our queue (/proc/net/netfilter/nfnetlink_queue, per
 * namespace): packets dropped because the queue was full, or because our socket's buffer
 * was. Both mean the line could not keep up: more loss than asked for. */
static void kernel_drops(unsigned queue, long long *queue_dropped, long long *user_dropped)
{
    *queue_dropped = *user_dropped = -1;
    FILE *f = fopen("/proc/net/netfilter/nfnetlink_queue", "r");
    if (f == NULL)
        return;
    unsigned num, portid, mode, range, total, qdrop, udrop, lastid, one;
    while (fscanf(f, "%u %u %u %u %u %u %u %u %u", &num, &portid, &total, &mode, &range,
                  &qdrop, &udrop, &lastid, &one) == 9) {
        if (num == queue) {
            *queue_dropped = qdrop;
            *user_dropped = udrop;
        }
    }
    fclose(f);
}

static void print_stats(struct line *ln, long long queue_dropped, long long user_dropped)
{
    uint64_t over_1ms = 0, p99 = 0, seen = 0;
    for (unsigned b = 0; b < LATE_BUCKETS; b++) {
        if ((b + 1) * LATE_BUCKET_US > 1000)
            over_1ms += ln->late_hist[b];
        seen += ln->late_hist[b];
        if (!p99 && ln->releases && seen * 100 >= ln->releases * 99)
            p99 = (uint64_t)(b + 1) * LATE_BUCKET_US;
    }
    printf("{\"queue\": %u, \"delay_ms\": %g, \"loss_pct\": %g, \"rate_mbit\": %g, "
           "\"limit\": %u, \"seed\": %" PRIu64 ", \"realtime\": %s, "
           "\"received\": %" PRIu64 ", \"dropped\": %" PRIu64 ", \"accepted\": %" PRIu64 ", "
           "\"bytes\": %" PRIu64 ", \"max_held\": %" PRIu64 ", \"overflow\": %" PRIu64 ", "
           "\"enobufs\": %" PRIu64 ", \"verdict_errors\": %" PRIu64 ", "
           "\"kernel_queue_dropped\": %lld, \"kernel_user_dropped\": %lld, "
           "\"late_mean_us\": %.1f, \"late_max_us\": %.1f, \"late_p99_us_at_most\": %" PRIu64
           ", \"late_over_1ms\": %" PRIu64 ", \"peak_pps\": %" PRIu64
           ", \"verdict_max_us\": %.1f}\n",
           ln->set.queue, ln->set.delay_ms, ln->set.loss_pct, ln->set.rate_mbit, ln->set.limit,
           ln->set.seed, ln->set.realtime ? "true" : "false", ln->received, ln->dropped,
           ln->accepted, ln->bytes, ln->max_held, ln->overflow, ln->enobufs,
           ln->verdict_errors, queue_dropped, user_dropped,
           ln->releases ? ln->late_sum_ns / 1e3 / ln->releases : 0.0, ln->late_max_ns / 1e3,
           p99, over_1ms, ln->peak_window_packets * (1000000000u / PEAK_WINDOW_NS),
           ln->verdict_max_ns / 1e3);
    fflush(stdout);
}

static void usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s --queue Q [--delay-ms D] [--loss-pct P] [--rate-mbit R] [--limit N]\n"
            "          [--seed S] [--realtime]\n",
            prog);
}

static int parse(int argc, char **argv, struct settings *set)
{
    static const struct option opts[] = {
        {"queue", required_argument, 0, 'q'},    {"delay-ms", required_argument, 0, 'd'},
        {"loss-pct", required_argument, 0, 'l'}, {"rate-mbit", required_argument, 0, 'r'},
        {"limit", required_argument, 0, 'n'},    {"seed", required_argument, 0, 's'},
        {"realtime", no_argument, 0, 't'},       {0, 0, 0, 0}};
    int have_queue = 0, c;
    char *end;
    *set = (struct settings){.limit = 10000, .seed = 1};
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        errno = 0;
        end = NULL;
        switch (c) {
        case 'q': set->queue = (unsigned)strtoul(optarg, &end, 10); have_queue = 1; break;
        case 'd': set->delay_ms = strtod(optarg, &end); break;
        case 'l': set->loss_pct = strtod(optarg, &end); break;
        case 'r': set->rate_mbit = strtod(optarg, &end); break;
        case 'n': set->limit = (unsigned)strtoul(optarg, &end, 10); break;
        case 's': set->seed = strtoull(optarg, &end, 0); break;
        case 't': set->realtime = 1; break;
        default: return -1;
        }
        if (end != NULL && (*end != '\0' || end == optarg || errno)) {
            fprintf(stderr, "delayline: bad value %s\n", optarg);
            return -1;
        }
    }
    if (!have_queue || optind != argc || set->queue > 65535 || set->delay_ms < 0 ||
        set->delay_ms > 10000 || set->loss_pct < 0 || set->loss_pct >= 100 ||
        set->rate_mbit < 0 || set->limit < 1 || set->limit > 1000000)
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    struct line ln = {0};
    if (parse(argc, argv, &ln.set) < 0) {
        usage(argv[0]);
        return 2;
    }
    ln.delay_ns = (uint64_t)(ln.set.delay_ms * 1e6);
    ln.loss_threshold = (uint64_t)(ln.set.loss_pct / 100.0 * 18446744073709551615.0);
    ln.rng = ln.set.seed;
    ln.ring = calloc(ln.set.limit, sizeof *ln.ring);
    if (ln.ring == NULL) {
        perror("delayline: calloc");
        return 1;
    }
    if (ln.set.realtime) {
        /* A wake-up late by a scheduler tick would add milliseconds to the delay when the
         * lab's CPUs are busy; a real-time priority makes it tens of microseconds. */
        struct sched_param sp = {.sched_priority = 10};
        if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0)
            perror("delayline: SCHED_FIFO (continuing without)");
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct nfq_handle *h = nfq_open();
    if (h == NULL) {
        perror("delayline: nfq_open");
        return 1;
    }
    ln.qh = nfq_create_queue(h, (uint16_t)ln.set.queue, on_packet, &ln);
    if (ln.qh == NULL) {
        fprintf(stderr, "delayline: cannot bind queue %u (another listener?): %s\n",
                ln.set.queue, strerror(errno));
        nfq_close(h);
        return 1;
    }
    if (nfq_set_mode(ln.qh, NFQNL_COPY_PACKET, COPY_BYTES) < 0 ||
        nfq_set_queue_maxlen(ln.qh, ln.set.limit) < 0) {
        perror("delayline: queue settings");
        nfq_destroy_queue(ln.qh);
        nfq_close(h);
        return 1;
    }
    int fd = nfq_fd(h);
    /* Room for a full queue's worth of messages. If it still overflows, recv() fails with
     * ENOBUFS (counted) and the kernel counts the packets as user_dropped. */
    nfnl_rcvbufsiz(nfq_nfnlh(h), 8u << 20);
    fprintf(stderr, "delayline: queue %u, delay %g ms, loss %g%%, rate %s%g%s, limit %u\n",
            ln.set.queue, ln.set.delay_ms, ln.set.loss_pct, ln.set.rate_mbit ? "" : "(none) ",
            ln.set.rate_mbit, ln.set.rate_mbit ? " Mb/s" : "", ln.set.limit);

    static char buf[1 << 16] __attribute__((aligned));
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    sigset_t blocked, during_poll;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, &during_poll);   /* signals arrive only in ppoll */
    int status = 0;
    while (!stopping) {
        uint64_t now = now_ns();
        release_due(&ln, now, 0);
        struct timespec wait, *timeout = NULL;
        if (ln.count) {
            uint64_t left = ln.ring[ln.head].release_ns - now;   /* > 0: not yet due */
            wait.tv_sec = (time_t)(left / 1000000000u);
            wait.tv_nsec = (long)(left % 1000000000u);
            timeout = &wait;
        }
        int ready = ppoll(&pfd, 1, timeout, &during_poll);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("delayline: ppoll");
            status = 1;
            break;
        }
        if (!ready)
            continue;
        for (int i = 0; i < RECV_BATCH; i++) {
            ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == ENOBUFS) {
                    ln.enobufs++;
                    continue;
                }
                if (errno != EAGAIN && errno != EINTR) {
                    perror("delayline: recv");
                    status = 1;
                    stopping = 1;
                }
                break;
            }
            nfq_handle_packet(h, buf, (int)n);
        }
    }
    release_due(&ln, now_ns(), 1);   /* nothing held is lost by stopping */
    long long queue_dropped, user_dropped;
    kernel_drops(ln.set.queue, &queue_dropped, &user_dropped);
    print_stats(&ln, queue_dropped, user_dropped);
    nfq_destroy_queue(ln.qh);
    nfq_close(h);
    free(ln.ring);
    return status;
}

/* One connection, N sequential GETs of one key; prints the round trips' percentiles in ns.
 *
 * bench_resp.py builds and runs it: redis-benchmark's histogram rounds latencies this small to
 * 8 us buckets. A C client adds almost nothing of its own to each round trip.
 *
 *   cc -O2 -o resp_latency resp_latency.c && ./resp_latency PORT KEY N
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Read one bulk-string (or nil) reply; returns 0, or -1 on error. */
static int read_reply(int fd, char *buf, size_t size) {
    size_t have = 0;
    long need = -1;
    for (;;) {
        ssize_t got = read(fd, buf + have, size - have);
        if (got <= 0) return -1;
        have += (size_t)got;
        if (need < 0) {
            char *nl = memchr(buf, '\n', have);
            if (nl == NULL) continue;
            if (buf[0] != '$') return -1;
            long len = strtol(buf + 1, NULL, 10);
            need = (nl - buf + 1) + (len < 0 ? 0 : len + 2);
        }
        if ((long)have >= need) return 0;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT KEY N\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), n = atoi(argv[3]);
    const char *key = argv[2];
    char cmd[1024], buf[65536];
    int len = snprintf(cmd, sizeof cmd, "*2\r\n$3\r\nGET\r\n$%zu\r\n%s\r\n", strlen(key), key);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    long *rtt = malloc(sizeof(long) * n);
    for (int i = 0; i < n; i++) {
        long start = now_ns();
        if (write(fd, cmd, len) != len || read_reply(fd, buf, sizeof buf) != 0) {
            fprintf(stderr, "request %d failed\n", i);
            return 1;
        }
        rtt[i] = now_ns() - start;
    }
    qsort(rtt, n, sizeof(long), cmp);
    printf("%ld %ld %ld\n", rtt[n / 2], rtt[n * 9 / 10], rtt[n * 99 / 100]);
    return 0;
}

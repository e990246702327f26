/* The floor of a forwarder that honours R2: nothing but forwarding, each query on a fresh
 * socket connected to the upstream (its own random source port) with a fresh random ID, the
 * way flatdns sends a miss. No cache, no checks beyond the ID, no timeouts: a lost reply
 * leaks its socket until the harness kills this process.
 *
 * Two threads, as in dnsdist and flatdns's UDP listener: one blocks in recvfrom on the
 * client socket and sends each query upstream, registering the upstream socket with an
 * epoll set; the other waits on that set, sends each reply back to its client with the
 * client's ID, and closes the socket.
 *
 * Usage: floor IP PORT UPSTREAM_IP UPSTREAM_PORT. Killed by the harness. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

struct pending {
    int fd;
    struct sockaddr_in client;
    unsigned char id[2];
    unsigned char sent_id[2];
};

static int client_fd, ep;

static void *replies(void *arg) {
    (void)arg;
    struct epoll_event evs[64];
    unsigned char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, 1000);
        for (int i = 0; i < n; i++) {
            struct pending *p = evs[i].data.ptr;
            ssize_t len = recv(p->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (len < 12 || buf[0] != p->sent_id[0] || buf[1] != p->sent_id[1])
                continue; /* not the reply: keep waiting */
            buf[0] = p->id[0];
            buf[1] = p->id[1];
            (void)sendto(client_fd, buf, (size_t)len, MSG_DONTWAIT,
                         (struct sockaddr *)&p->client, sizeof p->client);
            close(p->fd);
            free(p);
        }
    }
    return NULL;
}

static int addr(struct sockaddr_in *a, const char *ip, const char *port) {
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((unsigned short)atoi(port));
    return inet_pton(AF_INET, ip, &a->sin_addr) == 1;
}

int main(int argc, char **argv) {
    struct sockaddr_in me, up;
    if (argc != 5 || !addr(&me, argv[1], argv[2]) || !addr(&up, argv[3], argv[4])) {
        fprintf(stderr, "usage: %s IP PORT UPSTREAM_IP UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    client_fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (client_fd < 0 || bind(client_fd, (struct sockaddr *)&me, sizeof me) < 0) {
        perror("bind");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    pthread_t t;
    if (ep < 0 || pthread_create(&t, NULL, replies, NULL) != 0) {
        perror("epoll/thread");
        return 1;
    }
    uint64_t rng = 0;
    if (getrandom(&rng, sizeof rng, 0) != sizeof rng) rng = 0x9e3779b97f4a7c15u;
    unsigned char buf[65536];
    for (;;) {
        struct pending *p = malloc(sizeof *p);
        if (!p) return 1;
        socklen_t fromlen = sizeof p->client;
        ssize_t n = recvfrom(client_fd, buf, sizeof buf, 0, (struct sockaddr *)&p->client, &fromlen);
        if (n < 12) { free(p); continue; }
        p->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (p->fd < 0 || connect(p->fd, (struct sockaddr *)&up, sizeof up) < 0) {
            if (p->fd >= 0) close(p->fd);
            free(p);
            continue;
        }
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; /* xorshift64 */
        memcpy(p->id, buf, 2);
        p->sent_id[0] = (unsigned char)rng;
        p->sent_id[1] = (unsigned char)(rng >> 8);
        memcpy(buf, p->sent_id, 2);
        (void)send(p->fd, buf, (size_t)n, 0);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = p};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, p->fd, &ev) < 0) { close(p->fd); free(p); }
    }
}

/* The limit: a bare UDP echo server. One recvfrom + one sendto per packet; the reply is the
 * query bytes with the QR bit set (a valid, empty NOERROR answer as far as dnsperf cares).
 * Usage: echo IP PORT. Single-threaded, blocking; killed by the harness. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IP PORT\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) { fprintf(stderr, "bad IP\n"); return 2; }
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
    unsigned char buf[65536];
    for (;;) {
        struct sockaddr_storage from;
        socklen_t fromlen = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 12) continue; /* error or shorter than a DNS header: drop */
        buf[2] |= 0x80;       /* QR = 1 */
        (void)sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fromlen);
    }
}

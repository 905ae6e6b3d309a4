/*
 * The quantized all-reduce from C, run as separate processes by tests/c_quantized.rs.
 *
 *   quantized master SECRET
 *       runs a master, prints "addr HOST:PORT", serves until stdin closes.
 *   quantized peer ADDR SECRET N
 *       forms a group of N; all-reduces (sum) 100003 floats with 8- and 16-bit codes,
 *       checks each element's error against the bound n * (sum of the ranks' ranges) /
 *       (2^bits - 1) (the inputs are a function of the rank, so every peer computes the
 *       exact sum), averages once, checks the argument errors, and prints per call
 *       "quantized bits=B op=OP rank=R hash=H err=E bound=D" (H: FNV-1a of the bytes).
 *
 * Every line of output is one event; failures print "FAIL ..." and exit 1.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "phalanx.h"

static void fail_at(int line, const char *what, int status) {
    printf("FAIL line %d: %s -> %s: %s\n", line, what, phx_status_name(status), phx_last_error());
    exit(1);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        int status_ = (call);                                                                      \
        if (status_ != PHX_OK) fail_at(__LINE__, #call, status_);                                  \
    } while (0)

#define EXPECT(cond)                                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("FAIL line %d: expected %s\n", __LINE__, #cond);                                \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define EXPECT_STATUS(call, want)                                                                  \
    do {                                                                                           \
        int status_ = (call);                                                                      \
        if (status_ != (want)) fail_at(__LINE__, #call, status_);                                  \
        EXPECT(strlen(phx_last_error()) > 0);                                                      \
    } while (0)

enum { LEN = 100003 };

static void sleep_ms(long ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

static size_t comm_size(const phx_comm *comm) {
    size_t size = 0;
    CHECK(phx_comm_size(comm, &size));
    return size;
}

static size_t comm_rank(const phx_comm *comm) {
    size_t rank = 0;
    CHECK(phx_comm_rank(comm, &rank));
    return rank;
}

static int run_master(const char *secret) {
    phx_master *master = NULL;
    char addr[PHX_ADDR_BUF_LEN];
    CHECK(phx_master_start("127.0.0.1:0", secret, 1000, &master));
    CHECK(phx_master_addr(master, addr, sizeof addr));
    printf("addr %s\n", addr);
    while (getchar() != EOF) {
    }
    CHECK(phx_master_free(master));
    return 0;
}

/* Rank r's element i. */
static float input(size_t r, size_t i) {
    return (float)(sin(0.001 * (double)i + (double)r) * (double)(r + 1));
}

static uint64_t fnv1a(const void *data, size_t len) {
    const uint8_t *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    for (i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int run_peer(const char *addr, const char *secret, size_t n) {
    static float buf[LEN];
    static double exact[LEN];
    phx_comm *comm = NULL;
    phx_connect_options options;
    size_t r, i, rank;
    double ranges = 0.0, magnitude = 0.0;
    int round;

    CHECK(phx_connect_options_init(&options));
    options.secret = secret;
    options.join_timeout_ms = 60000;
    CHECK(phx_comm_connect_with(addr, &options, &comm));
    while (comm_size(comm) < n) {
        size_t pending = 0;
        CHECK(phx_comm_peers_pending(comm, &pending));
        if (pending == 0) {
            sleep_ms(10);
            continue;
        }
        CHECK(phx_comm_update_topology(comm));
    }
    CHECK(phx_comm_barrier(comm));
    rank = comm_rank(comm);

    for (i = 0; i < LEN; i++) exact[i] = 0.0;
    for (r = 0; r < n; r++) {
        float lo = input(r, 0), hi = lo, mag = 0.0f;
        for (i = 0; i < LEN; i++) {
            float v = input(r, i);
            exact[i] += v;
            if (v < lo) lo = v;
            if (v > hi) hi = v;
            if (fabsf(v) > mag) mag = fabsf(v);
        }
        ranges += (double)hi - (double)lo;
        magnitude += mag;
    }

    /* Argument errors first: refused before anything is sent. */
    EXPECT_STATUS(phx_comm_all_reduce_quantized(comm, buf, LEN, PHX_OP_MIN, PHX_QUANT_U8),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_reduce_quantized(comm, buf, LEN, PHX_OP_SUM, 4), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_reduce_quantized(NULL, buf, LEN, PHX_OP_SUM, PHX_QUANT_U8), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_all_reduce_quantized(comm, NULL, LEN, PHX_OP_SUM, PHX_QUANT_U8), PHX_ERR_NULL);

    for (round = 0; round < 3; round++) {
        int bits = round == 1 ? PHX_QUANT_U16 : PHX_QUANT_U8;
        int op = round == 2 ? PHX_OP_AVG : PHX_OP_SUM;
        double levels = bits == PHX_QUANT_U8 ? 255.0 : 65535.0;
        double scale = op == PHX_OP_AVG ? 1.0 / (double)n : 1.0;
        double bound = scale * ((double)n * ranges / levels + 4.0 * (double)n * 1.2e-7 * magnitude) + 1e-6;
        double err = 0.0;
        for (i = 0; i < LEN; i++) buf[i] = input(rank, i);
        CHECK(phx_comm_all_reduce_quantized(comm, buf, LEN, op, bits));
        for (i = 0; i < LEN; i++) {
            double e = fabs((double)buf[i] - scale * exact[i]);
            if (e > err) err = e;
        }
        EXPECT(err <= bound);
        EXPECT(err > 0.0);
        printf("quantized bits=%d op=%s rank=%zu hash=%016llx err=%.9g bound=%.9g\n", bits,
               op == PHX_OP_AVG ? "avg" : "sum", rank, (unsigned long long)fnv1a(buf, sizeof buf), err,
               bound);
    }
    CHECK(phx_comm_barrier(comm));
    CHECK(phx_comm_leave(comm));
    printf("done rank=%zu\n", rank);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "master") == 0) return run_master(argv[2]);
    if (argc == 5 && strcmp(argv[1], "peer") == 0) return run_peer(argv[2], argv[3], (size_t)atoi(argv[4]));
    fprintf(stderr, "usage: see the comment at the top of quantized.c\n");
    return 2;
}

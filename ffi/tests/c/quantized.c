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
#include "peer_common.h"

#include <math.h>

enum { LEN = 100003 };

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
    phx_comm *comm = join_group(addr, secret, n);
    size_t r, i, rank;
    double ranges = 0.0, magnitude = 0.0;
    int round;

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
    if (is_role(argc, argv, "master", 3)) return master_serve(master_start(argv[2]));
    if (is_role(argc, argv, "peer", 5)) return run_peer(argv[2], argv[3], (size_t)atoi(argv[4]));
    fprintf(stderr, "usage: see the comment at the top of quantized.c\n");
    return 2;
}

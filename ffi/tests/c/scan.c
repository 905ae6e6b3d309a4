/*
 * All-scan from C, run as separate processes on 127.0.0.1 by tests/c_programs.rs
 * (the master is harness.c's "master" role):
 *
 *   scan ADDR SECRET 4
 *       forms a group of 4 and checks: built-in sum scans (inclusive, exclusive,
 *       reverse), the linear-attention example for several algorithms, a
 *       non-commutative callback (2x2 integer matrix products) against a left fold, a
 *       failing callback (every member gets PHX_ERR_ABORTED, buffers restored, the
 *       group still works), and the argument checks.
 *
 * Every line of output is one event; failures print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

/* 2x2 matrices of int64, row-major; products wrap like the library's integers. */
static void mat_mul(const int64_t *l, const int64_t *r, int64_t *o) {
    o[0] = l[0] * r[0] + l[1] * r[2];
    o[1] = l[0] * r[1] + l[1] * r[3];
    o[2] = l[2] * r[0] + l[3] * r[2];
    o[3] = l[2] * r[1] + l[3] * r[3];
}

/* The callback: user_data points to an int; non-zero makes it fail with that code. */
static int mat_combine(void *user_data, const void *left, const void *right, void *out, size_t units) {
    const int64_t *l = (const int64_t *)left;
    const int64_t *r = (const int64_t *)right;
    int64_t *o = (int64_t *)out;
    size_t u;
    int fail = user_data ? *(const int *)user_data : 0;
    if (fail) return fail;
    for (u = 0; u < units; u++) mat_mul(l + 4 * u, r + 4 * u, o + 4 * u);
    return 0;
}

#define UNITS 3

/* Rank q's matrices: shears, so that any swap of operands shows. */
static void mats_of(size_t q, int64_t *m) {
    size_t u;
    for (u = 0; u < UNITS; u++) {
        int64_t *x = m + 4 * u;
        x[0] = 1;
        x[3] = 1;
        x[1] = (q % 2 == 0) ? (int64_t)(q + u + 1) : 0;
        x[2] = (q % 2 == 0) ? 0 : (int64_t)(q + 2 * u + 1);
    }
}

/* Left fold over ranks first..last in scan order (step +1 or -1); identity if empty. */
static void mat_fold(size_t n, size_t r, int inclusive, int reverse, int64_t *out) {
    int64_t acc[4 * UNITS], x[4 * UNITS], tmp[4];
    size_t u, k, count;
    for (u = 0; u < UNITS; u++) {
        acc[4 * u] = 1;
        acc[4 * u + 1] = 0;
        acc[4 * u + 2] = 0;
        acc[4 * u + 3] = 1;
    }
    /* Positions in scan order before (or up to) r's. */
    count = reverse ? (n - 1 - r) : r;
    if (inclusive) count += 1;
    for (k = 0; k < count; k++) {
        size_t q = reverse ? n - 1 - k : k;
        mats_of(q, x);
        for (u = 0; u < UNITS; u++) {
            mat_mul(acc + 4 * u, x + 4 * u, tmp);
            memcpy(acc + 4 * u, tmp, sizeof tmp);
        }
    }
    memcpy(out, acc, sizeof acc);
}

static int run_scan(const char *addr, const char *secret, size_t n) {
    phx_comm *comm = join_group(addr, secret, n);
    size_t r, i, k;
    int32_t x[5];
    int flags;
    /* The example. */
    const float la_a[4][2] = {{0.5f, 1.0f}, {0.5f, 0.25f}, {0.25f, 0.5f}, {1.0f, 0.5f}};
    const float la_s[4][4] = {{1, 2, 3, 4}, {2, 0, 1, 1}, {4, 4, 0, 2}, {3, 1, 1, 0}};
    const float want_s[4][4] = {{1, 2, 3, 4}, {2.5f, 1, 1.75f, 2}, {4.625f, 4.25f, 0.875f, 3},
                                {7.625f, 5.25f, 1.4375f, 1.5f}};
    const int algos[3] = {0, 1, 2}; /* auto, chain of 2 blocks, recursive doubling */
    int64_t m[4 * UNITS], want[4 * UNITS], before[4 * UNITS];
    const int64_t identity[4] = {1, 0, 0, 1};
    int no_fail = 0, fail = 7;

    r = comm_rank(comm);
    EXPECT(n == 4 && comm_size(comm) == n);

    /* Built-in sum, i32: x_q[i] = 10 (q + 1) + i. */
    for (flags = 0; flags < 4; flags++) {
        int inclusive = !(flags & PHX_SCAN_EXCLUSIVE), reverse = (flags & PHX_SCAN_REVERSE) != 0;
        for (i = 0; i < 5; i++) x[i] = (int32_t)(10 * (r + 1) + i);
        CHECK(phx_comm_all_scan(comm, x, 5, PHX_DTYPE_I32, PHX_OP_SUM, flags, 0));
        for (i = 0; i < 5; i++) {
            int32_t s = 0;
            size_t q;
            for (q = 0; q < n; q++) {
                int before_r = reverse ? q > r : q < r;
                if (before_r || (inclusive && q == r)) s += (int32_t)(10 * (q + 1) + i);
            }
            EXPECT(x[i] == s);
        }
    }

    /* Linear attention: the numbers, exact, for each algorithm. */
    for (k = 0; k < 3; k++) {
        int algo_flags = algos[k] == 2 ? PHX_SCAN_RECURSIVE_DOUBLING : 0;
        size_t blocks = algos[k] == 1 ? 2 : 0;
        float a[2], s[4];
        memcpy(a, la_a[r], sizeof a);
        memcpy(s, la_s[r], sizeof s);
        CHECK(phx_comm_all_scan_linear_attention(comm, a, s, 2, 2, algo_flags, blocks));
        for (i = 0; i < 4; i++) EXPECT(s[i] == want_s[r][i]);
        memcpy(a, la_a[r], sizeof a);
        memcpy(s, la_s[r], sizeof s);
        CHECK(phx_comm_all_scan_linear_attention(comm, a, s, 2, 2, algo_flags | PHX_SCAN_EXCLUSIVE, blocks));
        for (i = 0; i < 4; i++) EXPECT(s[i] == (r == 0 ? 0.0f : want_s[r - 1][i]));
        EXPECT(r != 0 || (a[0] == 1.0f && a[1] == 1.0f));
    }

    /* A non-commutative callback against the left fold, every flag combination. */
    for (flags = 0; flags < 8; flags++) {
        mats_of(r, m);
        CHECK(phx_comm_all_scan_custom(comm, m, UNITS, 32, mat_combine, &no_fail, identity, "mat2", flags, 0));
        mat_fold(n, r, !(flags & PHX_SCAN_EXCLUSIVE), (flags & PHX_SCAN_REVERSE) != 0, want);
        EXPECT(memcmp(m, want, sizeof m) == 0);
    }

    /* Rank 1's callback fails: every member gets PHX_ERR_ABORTED, buffers restored. */
    mats_of(r, m);
    memcpy(before, m, sizeof m);
    EXPECT_STATUS(phx_comm_all_scan_custom(comm, m, UNITS, 32, mat_combine, r == 1 ? &fail : &no_fail,
                                           identity, "mat2", 0, 1),
                  PHX_ERR_ABORTED);
    EXPECT(memcmp(m, before, sizeof m) == 0);
    /* The group still works. */
    CHECK(phx_comm_all_scan_custom(comm, m, UNITS, 32, mat_combine, &no_fail, identity, "mat2", 0, 1));
    mat_fold(n, r, 1, 0, want);
    EXPECT(memcmp(m, want, sizeof m) == 0);

    /* Argument checks (local: nothing is sent). */
    EXPECT_STATUS(phx_comm_all_scan(comm, x, 5, PHX_DTYPE_I32, PHX_OP_AVG, 0, 0), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_scan(comm, x, 5, PHX_DTYPE_I32, PHX_OP_SUM, 64, 0), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_scan(comm, x, 5, PHX_DTYPE_I32, PHX_OP_SUM, PHX_SCAN_RECURSIVE_DOUBLING, 3),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_scan(NULL, x, 5, PHX_DTYPE_I32, PHX_OP_SUM, 0, 0), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_all_scan_custom(comm, m, UNITS, 32, NULL, NULL, identity, "mat2", 0, 0), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_all_scan_custom(comm, m, UNITS, 32, mat_combine, &no_fail, NULL, "mat2",
                                           PHX_SCAN_EXCLUSIVE, 0),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_scan_custom(comm, m, UNITS, 0, mat_combine, &no_fail, NULL, "mat2", 0, 0),
                  PHX_ERR_INVALID_ARGUMENT);

    CHECK(phx_comm_barrier(comm));
    printf("scan ok rank=%zu size=%zu\n", r, n);
    CHECK(phx_comm_leave(comm));
    return 0;
}

int main(int argc, char **argv) {
    if (is_role(argc, argv, "scan", 5)) return run_scan(argv[2], argv[3], (size_t)atoi(argv[4]));
    fprintf(stderr, "usage: scan scan ADDR SECRET N\n");
    return 2;
}

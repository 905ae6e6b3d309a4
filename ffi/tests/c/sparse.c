/*
 * The sparse collectives and all-to-all from C, run as separate processes on 127.0.0.1
 * by tests/c_programs.rs (the master is `harness master SECRET`):
 *
 *   sparse ADDR SECRET N
 *       forms a group of N (N = 4) and checks the exact results of the FSSDP example
 *       (spAG and spRS), all-to-all with equal and uneven counts, and the sparse
 *       all-reduce on both sides of the dense crossover; prints "sparse ok rank=R".
 *
 * Every line of output is one event; failures print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

enum { N = 4, EXPERTS = 8, DIM = 1000 };

/* The issue's example: owners d0 {e0,e1}, d1 {e2,e3}, d2 {e4,e5}, d3 {e6,e7}, each
 * expert 2 floats; every rank also holds e0 and e4. */
static void check_fssdp(phx_comm *comm, size_t r) {
    size_t lens[EXPERTS], owners[EXPERTS], e, d;
    uint8_t holds[EXPERTS * N];
    float params[2 * EXPERTS], grads[2 * EXPERTS];
    for (e = 0; e < EXPERTS; e++) {
        lens[e] = 2;
        owners[e] = e / 2;
        for (d = 0; d < N; d++) holds[e * N + d] = (uint8_t)(e == 0 || e == 4 || d == e / 2);
        params[2 * e] = owners[e] == r ? 10.0f * (float)e + 1.0f : -1.0f;
        params[2 * e + 1] = owners[e] == r ? 10.0f * (float)e + 2.0f : -1.0f;
        grads[2 * e] = grads[2 * e + 1] = 0.5f;
    }
    CHECK(phx_comm_sparse_all_gather(comm, params, 2 * EXPERTS, PHX_DTYPE_F32, N, EXPERTS, lens, owners, holds));
    EXPECT(params[0] == 1.0f && params[1] == 2.0f);
    EXPECT(params[8] == 41.0f && params[9] == 42.0f);
    for (e = 0; e < EXPERTS; e++) {
        if (e != 0 && e != 4 && owners[e] != r) EXPECT(params[2 * e] == -1.0f);
    }
    grads[0] = grads[1] = (float)(r + 1);
    grads[8] = 5.0f * (float)(r + 1);
    grads[9] = (float)(r + 1);
    CHECK(phx_comm_sparse_reduce_scatter(comm, grads, 2 * EXPERTS, PHX_DTYPE_F32, PHX_OP_SUM, N, EXPERTS, lens,
                                         owners, holds));
    if (r == 0) EXPECT(grads[0] == 10.0f && grads[1] == 10.0f);
    if (r == 2) EXPECT(grads[8] == 50.0f && grads[9] == 10.0f);
    EXPECT(grads[2] == 0.5f); /* e1 is not replicated: untouched */
    /* A placement for another group size is refused, buffer unchanged. */
    EXPECT_STATUS(phx_comm_sparse_all_gather(comm, params, 2 * EXPERTS, PHX_DTYPE_F32, N - 1, EXPERTS, lens, owners,
                                             holds),
                  PHX_ERR_INVALID_ARGUMENT);
}

static void check_all_to_all(phx_comm *comm, size_t r) {
    int32_t in[3 * N], out[3 * N], vin[64], vout[64], small[1];
    size_t send_counts[N], recv_counts[N], received = 0, i, j, k, at = 0, sent;
    for (j = 0; j < N; j++)
        for (k = 0; k < 3; k++) in[3 * j + k] = (int32_t)(100 * r + 10 * j + k);
    CHECK(phx_comm_all_to_all(comm, in, out, 3 * N, PHX_DTYPE_I32));
    for (i = 0; i < N; i++)
        for (k = 0; k < 3; k++) EXPECT(out[3 * i + k] == (int32_t)(100 * i + 10 * r + k));
    /* Uneven: rank i sends (i + j) % 3 elements to rank j. */
    for (j = 0; j < N; j++) {
        send_counts[j] = (r + j) % 3;
        for (k = 0; k < send_counts[j]; k++) vin[at++] = (int32_t)(1000 * r + 100 * j + k);
    }
    sent = at;
    CHECK(phx_comm_all_to_all_v(comm, vin, sent, send_counts, N, vout, 64, recv_counts, &received, PHX_DTYPE_I32));
    at = 0;
    for (i = 0; i < N; i++) {
        EXPECT(recv_counts[i] == (i + r) % 3);
        for (k = 0; k < recv_counts[i]; k++) EXPECT(vout[at++] == (int32_t)(1000 * i + 100 * r + k));
    }
    EXPECT(received == at);
    at = received;
    /* Too small an output (every rank receives at least 3): the exchange completes on
     * every rank, and the counts come back with the status. */
    received = 0;
    memset(recv_counts, 0, sizeof recv_counts);
    EXPECT_STATUS(phx_comm_all_to_all_v(comm, vin, sent, send_counts, N, small, 1, recv_counts, &received, PHX_DTYPE_I32),
                  PHX_ERR_BUFFER_TOO_SMALL);
    EXPECT(received == at && received >= 3);
    for (i = 0; i < N; i++) EXPECT(recv_counts[i] == (i + r) % 3);
}

static void check_sparse_all_reduce(phx_comm *comm, size_t r) {
    static float out[DIM], vals[300];
    static uint32_t idx[300];
    int dense = -1;
    size_t k;
    float total = 0.0f;
    /* Sparse: index 7 everywhere, 100 + r once per rank. */
    idx[0] = 7;
    idx[1] = (uint32_t)(100 + r);
    vals[0] = 1.5f;
    vals[1] = (float)(r + 1);
    CHECK(phx_comm_sparse_all_reduce(comm, DIM, idx, vals, 2, PHX_DTYPE_F32, out, &dense));
    EXPECT(dense == 0);
    EXPECT(out[7] == 6.0f);
    for (k = 0; k < N; k++) EXPECT(out[100 + k] == (float)(k + 1));
    for (k = 0; k < DIM; k++) total += out[k];
    EXPECT(total == 6.0f + 10.0f);
    /* Dense: 300 pairs per rank of 1000 (average density 0.3 > crossover 0.25). */
    for (k = 0; k < 300; k++) {
        idx[k] = (uint32_t)((3 * k + r) % DIM);
        vals[k] = 1.0f;
    }
    CHECK(phx_comm_sparse_all_reduce(comm, DIM, idx, vals, 300, PHX_DTYPE_F32, out, &dense));
    EXPECT(dense == 1);
    total = 0.0f;
    for (k = 0; k < DIM; k++) total += out[k];
    EXPECT(total == 1200.0f);
    idx[0] = DIM;
    EXPECT_STATUS(phx_comm_sparse_all_reduce(comm, DIM, idx, vals, 1, PHX_DTYPE_F32, out, &dense),
                  PHX_ERR_INVALID_ARGUMENT);
}

int main(int argc, char **argv) {
    phx_comm *comm;
    size_t r;
    if (!is_role(argc, argv, "sparse", 5) || atoi(argv[4]) != N) {
        printf("FAIL usage: sparse ADDR SECRET %d\n", N);
        return 2;
    }
    comm = join_group(argv[2], argv[3], N);
    r = comm_rank(comm);
    check_fssdp(comm, r);
    check_all_to_all(comm, r);
    check_sparse_all_reduce(comm, r);
    printf("sparse ok rank=%zu\n", r);
    CHECK(phx_comm_leave(comm));
    return 0;
}

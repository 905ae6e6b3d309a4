/*
 * Sub-group collectives and tagged point-to-point from C, over QUIC on 127.0.0.1.
 *
 *   subgroup
 *       one process runs a master and four peers on threads, then
 *   - pairs (0,1) and (2,3) all-reduce at the same time, exactly;
 *   - ranks (0,1,2) all-reduce while rank 3 calls nothing, then everyone all-reduces;
 *   - a NoLoCo step: every rank averages with phx_noloco_partner's choice;
 *   - rank 0 sends tags 1 and 2 (several chunks), rank 1 receives 2 then 1, and a
 *     receive of the wrong length fails with PHX_ERR_MISMATCH, buffer untouched;
 *   - ranks 0 and 1 each phx_comm_isend a large message to the other, then
 *     phx_comm_irecv; a freed receive request still takes its message; a wrong-length
 *     irecv fails at phx_request_wait with PHX_ERR_MISMATCH, buffer untouched.
 *       Prints "subgroup ok rank=R" per peer.
 *   subgroup master
 *       runs a master, prints "addr HOST:PORT", serves until stdin closes.
 *   subgroup peer ADDR
 *       one of four peer processes: ranks 0, 1 and 3 run a sub-group all-reduce; rank 3
 *       dies (_exit 42) instead of calling it, and rank 2, no member, calls
 *       update_topology meanwhile. Ranks 0 and 1 must fail with PEER_LOST or ABORTED,
 *       buffers restored; then the three survivors settle the view, all-reduce in the
 *       sub-group (0, 1) and in the whole group, exactly. Prints "lost status=S" and
 *       "survivor ok rank=R size=3".
 * Any failure prints "FAIL ..." and exits 1.
 */
#include "peer_common.h"

#include <unistd.h>

enum { N = 4, M = 1000, BIG = 200000 };

static const char *SECRET = "phalanx-ffi-subgroup-secret-0123456789";
static char ADDR[PHX_ADDR_BUF_LEN];

/* Rank 3 waits on this until (0,1,2) are done. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int sub_done = 0;

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    size_t r, i, partner = 0;
    int has = 0;
    static int64_t pair_buf[N][M];
    double avg[M];
    int32_t all[M];
    float *big;
    int32_t small[3], wrong[2] = {-5, -6};
    (void)arg;

    CHECK(phx_comm_rank(comm, &r));

    /* Pairs at once. */
    {
        size_t pair[2];
        pair[0] = r < 2 ? 0 : 2;
        pair[1] = pair[0] + 1;
        for (i = 0; i < M; i++) pair_buf[r][i] = (int64_t)(1000 * (r + 1) + i);
        CHECK(phx_comm_sub_all_reduce(comm, pair, 2, pair_buf[r], M, PHX_DTYPE_I64, PHX_OP_SUM));
        for (i = 0; i < M; i++)
            EXPECT(pair_buf[r][i] == (int64_t)(1000 * (pair[0] + 1) + 1000 * (pair[1] + 1) + 2 * i));
    }

    /* (0,1,2) without rank 3, which calls nothing meanwhile. */
    if (r == 3) {
        pthread_mutex_lock(&lock);
        while (!sub_done) pthread_cond_wait(&cond, &lock);
        pthread_mutex_unlock(&lock);
    } else {
        size_t trio[3] = {2, 0, 1};
        int32_t x[M];
        for (i = 0; i < M; i++) x[i] = (int32_t)(r + 1);
        CHECK(phx_comm_sub_all_reduce(comm, trio, 3, x, M, PHX_DTYPE_I32, PHX_OP_SUM));
        for (i = 0; i < M; i++) EXPECT(x[i] == 6);
        if (r == 0) {
            pthread_mutex_lock(&lock);
            sub_done = 1;
            pthread_cond_broadcast(&cond);
            pthread_mutex_unlock(&lock);
        }
    }
    for (i = 0; i < M; i++) all[i] = (int32_t)(1 << (4 * r));
    CHECK(phx_comm_all_reduce(comm, all, M, PHX_DTYPE_I32, PHX_OP_SUM));
    for (i = 0; i < M; i++) EXPECT(all[i] == 0x1111);

    /* A NoLoCo step: average with the partner of (seed 9, step 3). */
    CHECK(phx_noloco_partner(9, 3, N, r, &partner, &has));
    EXPECT(has == 1 && partner < N && partner != r);
    {
        size_t back = 99;
        int back_has = 0;
        size_t pair[2];
        CHECK(phx_noloco_partner(9, 3, N, partner, &back, &back_has));
        EXPECT(back_has == 1 && back == r);
        pair[0] = r;
        pair[1] = partner;
        for (i = 0; i < M; i++) avg[i] = 4.0 * (double)r + (double)i;
        CHECK(phx_comm_sub_all_reduce(comm, pair, 2, avg, M, PHX_DTYPE_F64, PHX_OP_AVG));
        for (i = 0; i < M; i++) EXPECT(avg[i] == 2.0 * (double)(r + partner) + (double)i);
    }

    /* Point-to-point between 0 and 1: tags out of order, a large message, a mismatch. */
    big = malloc(sizeof(float) * BIG);
    EXPECT(big != NULL);
    if (r == 0) {
        for (i = 0; i < BIG; i++) big[i] = (float)i;
        for (i = 0; i < 3; i++) small[i] = (int32_t)(7 * i + 1);
        CHECK(phx_comm_send(comm, 1, 1, small, 3, PHX_DTYPE_I32));
        CHECK(phx_comm_send(comm, 1, 2, big, BIG, PHX_DTYPE_F32));
        CHECK(phx_comm_send(comm, 1, 1, small, 3, PHX_DTYPE_I32));
    } else if (r == 1) {
        memset(big, 0, sizeof(float) * BIG);
        CHECK(phx_comm_recv(comm, 0, 2, big, BIG, PHX_DTYPE_F32));
        for (i = 0; i < BIG; i++) EXPECT(big[i] == (float)i);
        CHECK(phx_comm_recv(comm, 0, 1, small, 3, PHX_DTYPE_I32));
        for (i = 0; i < 3; i++) EXPECT(small[i] == (int32_t)(7 * i + 1));
        EXPECT(phx_comm_recv(comm, 0, 1, wrong, 2, PHX_DTYPE_I32) == PHX_ERR_MISMATCH);
        EXPECT(wrong[0] == -5 && wrong[1] == -6);
    }
    /* Non-blocking: 0 and 1 both send a large message to each other first, then
     * receive; a freed receive still takes its message; a wrong-length receive fails
     * at wait with its buffer untouched. */
    if (r < 2) {
        size_t peer = 1 - r;
        float *mine = malloc(sizeof(float) * BIG);
        phx_request *send_req = NULL, *recv_req = NULL, *dropped = NULL;
        int done = -1;
        EXPECT(mine != NULL);
        for (i = 0; i < BIG; i++) mine[i] = (float)(r * 3 + 1) * (float)i;
        memset(big, 0, sizeof(float) * BIG);
        CHECK(phx_comm_isend(comm, peer, 5, mine, BIG, PHX_DTYPE_F32, &send_req));
        CHECK(phx_comm_irecv(comm, peer, 5, big, BIG, PHX_DTYPE_F32, &recv_req));
        CHECK(phx_request_test(recv_req, &done));
        EXPECT(done == 0 || done == 1);
        CHECK(phx_request_wait(send_req));
        CHECK(phx_request_wait(recv_req));
        for (i = 0; i < BIG; i++) EXPECT(big[i] == (float)(peer * 3 + 1) * (float)i);
        free(mine);
        if (r == 0) {
            int32_t one[3] = {1, 2, 3}, two[3] = {4, 5, 6};
            CHECK(phx_comm_isend(comm, 1, 6, one, 3, PHX_DTYPE_I32, &send_req));
            CHECK(phx_request_wait(send_req));
            CHECK(phx_comm_send(comm, 1, 6, two, 3, PHX_DTYPE_I32));
            CHECK(phx_comm_send(comm, 1, 7, two, 3, PHX_DTYPE_I32));
        } else {
            int32_t got[3] = {0, 0, 0}, bad[2] = {-1, -2};
            CHECK(phx_comm_irecv(comm, 0, 6, got, 3, PHX_DTYPE_I32, &dropped));
            CHECK(phx_request_free(dropped));
            CHECK(phx_comm_irecv(comm, 0, 6, got, 3, PHX_DTYPE_I32, &recv_req));
            CHECK(phx_request_wait(recv_req));
            EXPECT(got[0] == 4 && got[2] == 6);
            CHECK(phx_comm_irecv(comm, 0, 7, bad, 2, PHX_DTYPE_I32, &recv_req));
            EXPECT(phx_request_wait(recv_req) == PHX_ERR_MISMATCH);
            EXPECT(bad[0] == -1 && bad[1] == -2);
        }
        EXPECT(phx_comm_isend(comm, r, 1, small, 3, PHX_DTYPE_I32, &send_req) == PHX_ERR_INVALID_ARGUMENT);
        EXPECT(phx_request_wait(NULL) == PHX_ERR_NULL);
        CHECK(phx_request_free(NULL));
    }
    free(big);
    EXPECT(phx_comm_send(comm, r, 1, small, 3, PHX_DTYPE_I32) == PHX_ERR_INVALID_ARGUMENT);
    {
        size_t outside[2] = {r, N};
        EXPECT(phx_comm_sub_all_reduce(comm, outside, 2, all, M, PHX_DTYPE_I32, PHX_OP_SUM) ==
               PHX_ERR_INVALID_ARGUMENT);
    }

    CHECK(phx_comm_barrier(comm));
    printf("subgroup ok rank=%zu\n", r);
    CHECK(phx_comm_leave(comm));
    return NULL;
}

static int run_peer(const char *addr) {
    phx_comm *comm = join_group(addr, SECRET, N);
    size_t r, i, size;
    static int64_t x[BIG], before[BIG];
    int32_t all[M];
    size_t trio[3] = {0, 1, 3}, pair[2] = {0, 1};
    CHECK(phx_comm_rank(comm, &r));
    printf("ready rank=%zu\n", r);
    if (r == 3) {
        sleep_ms(500);
        _exit(42);
    }
    if (r == 2) {
        CHECK(phx_comm_update_topology(comm)); /* not a member: the trio is not disturbed */
    } else {
        int status;
        for (i = 0; i < BIG; i++) before[i] = x[i] = (int64_t)(i * (r + 1));
        status = phx_comm_sub_all_reduce(comm, trio, 3, x, BIG, PHX_DTYPE_I64, PHX_OP_SUM);
        printf("lost status=%s\n", phx_status_name(status));
        EXPECT(status == PHX_ERR_PEER_LOST || status == PHX_ERR_ABORTED);
        EXPECT(memcmp(x, before, sizeof x) == 0);
        CHECK(phx_comm_update_topology(comm));
    }
    size = comm_size(comm); /* before anyone leaves */
    EXPECT(size == 3);
    CHECK(phx_comm_rank(comm, &r));
    if (r < 2) {
        for (i = 0; i < BIG; i++) x[i] = (int64_t)(i * (r + 1));
        CHECK(phx_comm_sub_all_reduce(comm, pair, 2, x, BIG, PHX_DTYPE_I64, PHX_OP_SUM));
        for (i = 0; i < BIG; i++) EXPECT(x[i] == (int64_t)(3 * i));
    }
    for (i = 0; i < M; i++) all[i] = (int32_t)(1 << (4 * r));
    CHECK(phx_comm_all_reduce(comm, all, M, PHX_DTYPE_I32, PHX_OP_SUM));
    for (i = 0; i < M; i++) EXPECT(all[i] == 0x111);
    printf("survivor ok rank=%zu size=%zu\n", r, size);
    CHECK(phx_comm_leave(comm));
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (is_role(argc, argv, "master", 2)) return master_serve(master_start(SECRET));
    if (is_role(argc, argv, "peer", 3)) return run_peer(argv[2]);
    run_peer_threads(SECRET, ADDR, N, peer);
    printf("all ok\n");
    return 0;
}

/*
 * Device communicators from C, one process: run by tests/c_device.rs.
 *
 * Three peers on threads (a master in this process, QUIC on 127.0.0.1) each make a
 * phx_device_comm on the CPU stand-in from their phx_comm: two all-reduces of
 * rank + 1 give exactly 6 (the unique id through the master, made once); a float64
 * buffer is refused (the stand-in reduces float32) with the buffer unchanged; NULL
 * arguments are refused. Every other device collective runs on the stand-in with
 * exact values (integers in floats): reduce-scatter, all-gather, broadcast from rank 1,
 * reduce (max) into rank 2, a ring of grouped sends and receives, all-to-all; then
 * refused arguments (a root or peer outside the view, float64, NULL arrays and
 * buffers) leave the buffers unchanged and the device communicator usable (a broadcast
 * after them). Then rank 2 leaves; the survivors call phx_comm_update_topology and
 * their next all-reduce and all-to-all are exact over the new view of 2.
 *
 * Asking for NCCL with PHALANX_NCCL_LIBRARY at a file that does not exist is
 * PHX_ERR_DEVICE (never a crash), no handle made; the message is printed for the
 * harness, which checks it names the path (or, without the nccl feature, the feature).
 *
 * Prints "device ok rank=R" per peer, "nccl error: MESSAGE" and "all ok" on success.
 */
#include "peer_common.h"

enum { N = 3, LEN = 16 };

static const char *SECRET = "phalanx-ffi-device-secret-0123456789";
static char ADDR[PHX_ADDR_BUF_LEN];

static void fill(float *buf, float v) {
    size_t i;
    for (i = 0; i < LEN; i++) buf[i] = v;
}

static int all_equal(const float *buf, float v) {
    size_t i;
    for (i = 0; i < LEN; i++)
        if (buf[i] != v) return 0;
    return 1;
}

/* Every collective other than all-reduce, on a view of N ranks, exact values. */
static void other_collectives(phx_device_comm *dev, phx_comm *comm) {
    size_t rank = comm_rank(comm), i, j;
    float send[N * 4], recv[N * 4], chunk[3], got[3];
    size_t to = (rank + 1) % N, from = (rank + N - 1) % N, bad_peer = N + 2;
    const void *send_ptr = chunk;
    void *recv_ptr = got;
    size_t three = 3;

    /* Reduce-scatter: sum over ranks of (r + 1) * (k + 1) is 6 * (k + 1). */
    for (i = 0; i < N * 4; i++) send[i] = (float)((rank + 1) * (i + 1));
    CHECK(phx_device_comm_reduce_scatter(dev, comm, send, recv, 4, PHX_DTYPE_F32, PHX_OP_SUM, NULL));
    for (i = 0; i < 4; i++) EXPECT(recv[i] == (float)(6 * (rank * 4 + i + 1)));

    /* All-gather: rank r gives 10 r, 10 r + 1. */
    send[0] = (float)(10 * rank);
    send[1] = (float)(10 * rank + 1);
    CHECK(phx_device_comm_all_gather(dev, comm, send, recv, 2, PHX_DTYPE_F32, NULL));
    for (i = 0; i < N; i++) EXPECT(recv[2 * i] == (float)(10 * i) && recv[2 * i + 1] == (float)(10 * i + 1));

    /* Broadcast from rank 1: 100 + i everywhere. */
    for (i = 0; i < 4; i++) send[i] = (float)(rank * 100 + i);
    CHECK(phx_device_comm_broadcast(dev, comm, send, 4, PHX_DTYPE_F32, 1, NULL));
    for (i = 0; i < 4; i++) EXPECT(send[i] == (float)(100 + i));

    /* Reduce (max) into rank 2: 2 + i there, the others' unchanged. */
    for (i = 0; i < 4; i++) send[i] = (float)(rank + i);
    CHECK(phx_device_comm_reduce(dev, comm, send, 4, PHX_DTYPE_F32, PHX_OP_MAX, 2, NULL));
    for (i = 0; i < 4; i++) EXPECT(send[i] == (float)((rank == 2 ? 2 : rank) + i));

    /* A ring: each rank sends rank + 1 to the next and receives from the previous. */
    for (i = 0; i < 3; i++) chunk[i] = (float)(rank + 1);
    CHECK(phx_device_comm_send_recv(dev, comm, &to, &send_ptr, &three, 1, &from, &recv_ptr, &three, 1,
                                    PHX_DTYPE_F32, NULL));
    for (i = 0; i < 3; i++) EXPECT(got[i] == (float)(from + 1));

    /* All-to-all, chunks of 2: rank r sends 100 r + 10 j + k to rank j. */
    for (j = 0; j < N; j++)
        for (i = 0; i < 2; i++) send[2 * j + i] = (float)(100 * rank + 10 * j + i);
    CHECK(phx_device_comm_all_to_all(dev, comm, send, recv, 2, PHX_DTYPE_F32, NULL));
    for (j = 0; j < N; j++)
        for (i = 0; i < 2; i++) EXPECT(recv[2 * j + i] == (float)(100 * j + 10 * rank + i));

    /* Refused before anything is sent: buffers unchanged, the communicator kept. */
    for (i = 0; i < 4; i++) send[i] = 7.0f;
    EXPECT_STATUS(phx_device_comm_broadcast(dev, comm, send, 4, PHX_DTYPE_F32, N, NULL), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "root 3 of 3") != NULL);
    EXPECT_STATUS(phx_device_comm_reduce(dev, comm, send, 4, PHX_DTYPE_F32, PHX_OP_SUM, N, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_device_comm_send_recv(dev, comm, &bad_peer, &send_ptr, &three, 1, NULL, NULL, NULL, 0,
                                            PHX_DTYPE_F32, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "peer 5") != NULL);
    EXPECT_STATUS(phx_device_comm_all_gather(dev, comm, send, recv, 2, PHX_DTYPE_F64, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_device_comm_reduce_scatter(dev, comm, send, recv, 1, PHX_DTYPE_F32, 9, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_device_comm_send_recv(dev, comm, NULL, &send_ptr, &three, 1, NULL, NULL, NULL, 0,
                                            PHX_DTYPE_F32, NULL),
                  PHX_ERR_NULL);
    EXPECT_STATUS(phx_device_comm_all_to_all(dev, comm, send, NULL, 1, PHX_DTYPE_F32, NULL), PHX_ERR_NULL);
    EXPECT_STATUS(phx_device_comm_reduce_scatter(NULL, comm, send, recv, 1, PHX_DTYPE_F32, PHX_OP_SUM, NULL),
                  PHX_ERR_NULL);
    EXPECT_STATUS(phx_device_comm_broadcast(dev, NULL, send, 4, PHX_DTYPE_F32, 0, NULL), PHX_ERR_NULL);
    for (i = 0; i < 4; i++) EXPECT(send[i] == 7.0f);
    if (rank == 0) send[0] = 42.0f;
    CHECK(phx_device_comm_broadcast(dev, comm, send, 1, PHX_DTYPE_F32, 0, NULL));
    EXPECT(send[0] == 42.0f);
}

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    phx_device_comm *dev = NULL, *none = NULL;
    float buf[LEN];
    double wide[LEN];
    size_t rank = comm_rank(comm), i;
    (void)arg;

    CHECK(phx_device_comm_new(comm, PHX_DEVICE_STANDIN, &dev));
    EXPECT(dev != NULL);
    EXPECT_STATUS(phx_device_comm_new(comm, 7, &none), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_device_comm_new(NULL, PHX_DEVICE_STANDIN, &none), PHX_ERR_NULL);
    EXPECT(none == NULL);

    for (i = 0; i < 2; i++) {
        fill(buf, (float)rank + 1.0f);
        CHECK(phx_device_comm_all_reduce(dev, comm, buf, LEN, PHX_DTYPE_F32, PHX_OP_SUM, NULL));
        EXPECT(all_equal(buf, 6.0f));
    }
    for (i = 0; i < LEN; i++) wide[i] = 1.5;
    EXPECT_STATUS(phx_device_comm_all_reduce(dev, comm, wide, LEN, PHX_DTYPE_F64, PHX_OP_SUM, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(wide[0] == 1.5 && wide[LEN - 1] == 1.5);
    EXPECT_STATUS(phx_device_comm_all_reduce(dev, comm, NULL, LEN, PHX_DTYPE_F32, PHX_OP_SUM, NULL), PHX_ERR_NULL);
    other_collectives(dev, comm);

    if (rank == 2) {
        CHECK(phx_device_comm_free(dev));
        CHECK(phx_comm_leave(comm));
        printf("device ok rank=%zu\n", rank);
        return NULL;
    }
    /* The next view (without rank 2) has its own device communicator. */
    CHECK(phx_comm_update_topology(comm));
    EXPECT(comm_size(comm) == 2);
    fill(buf, (float)comm_rank(comm) + 1.0f);
    CHECK(phx_device_comm_all_reduce(dev, comm, buf, LEN, PHX_DTYPE_F32, PHX_OP_SUM, NULL));
    EXPECT(all_equal(buf, 3.0f));
    /* All-to-all over the 2 survivors: chunk j from rank j is 10 j + r. */
    rank = comm_rank(comm);
    for (i = 0; i < 2; i++) buf[i] = (float)(10 * rank + i);
    CHECK(phx_device_comm_all_to_all(dev, comm, buf, buf + 2, 1, PHX_DTYPE_F32, NULL));
    for (i = 0; i < 2; i++) EXPECT(buf[2 + i] == (float)(10 * i + rank));
    CHECK(phx_device_comm_free(dev));
    CHECK(phx_device_comm_free(NULL));
    CHECK(phx_comm_leave(comm));
    printf("device ok rank=%zu\n", rank);
    return NULL;
}

static void nccl_missing(void) {
    phx_master *master = master_start(SECRET);
    phx_comm *comm;
    phx_device_comm *dev = NULL;
    CHECK(phx_master_addr(master, ADDR, sizeof ADDR));
    comm = join_group(ADDR, SECRET, 1);
    EXPECT(setenv("PHALANX_NCCL_LIBRARY", "/nonexistent/phalanx-test/libnccl.so.2", 1) == 0);
    EXPECT_STATUS(phx_device_comm_new(comm, PHX_DEVICE_NCCL, &dev), PHX_ERR_DEVICE);
    EXPECT(dev == NULL);
    printf("nccl error: %s\n", phx_last_error());
    CHECK(phx_comm_leave(comm));
    CHECK(phx_master_free(master));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    run_peer_threads(SECRET, ADDR, N, peer);
    nccl_missing();
    printf("all ok\n");
    return 0;
}

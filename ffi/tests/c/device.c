/*
 * Device communicators from C, one process: run by tests/c_device.rs.
 *
 * Three peers on threads (a master in this process, QUIC on 127.0.0.1) each make a
 * phx_device_comm on the CPU stand-in from their phx_comm: two all-reduces of
 * rank + 1 give exactly 6 (the unique id through the master, made once); a float64
 * buffer is refused (the stand-in reduces float32) with the buffer unchanged; NULL
 * arguments are refused. Then rank 2 leaves; the survivors call
 * phx_comm_update_topology and their next all-reduce gives exactly 3 over the new view.
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

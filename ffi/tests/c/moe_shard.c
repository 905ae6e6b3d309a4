/*
 * Sharding of expert parallelism (FSSDP) from C, one process: run by
 * tests/c_moe_shard.rs.
 *
 * Without a group: phx_moe_plan_sharding gives the worked example's owners (4 equal
 * devices, 8 experts: [0,0,1,1,2,2,3,3]) and, over two layers with loads, spreads the two
 * hot experts; experts that do not fit are refused. phx_moe_plan_backups puts no backup
 * on its owner and spreads them (two per device); phx_moe_after_loss gives each lost
 * expert to its backup, renumbered, and refuses a backup on its owner.
 *
 * Then a re-sharding on four peers on threads (a master in this process, QUIC on
 * 127.0.0.1): phx_moe_reshard_move moves parameters and momentum of the experts that
 * change owner, after which each next owner's slots equal the former owner's bitwise.
 *
 * Prints "shard ok", one "move ok rank=R" per peer and "all ok" on success; failures
 * print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

enum { N = 4, EXPERTS = 8, LEN = 3 };

static const char *SECRET = "phalanx-ffi-moe-shard-secret-012345";
static char ADDR[PHX_ADDR_BUF_LEN];

static const size_t NOW[EXPERTS] = {0, 0, 1, 1, 2, 2, 3, 3};
static const size_t NEXT[EXPERTS] = {0, 1, 1, 2, 2, 3, 3, 0};

/* Expert e's state, element k, of buffer b: distinct full-mantissa floats. */
static float value(size_t b, size_t e, size_t k) {
    return 1.0f / (float)(3 + 100 * b + 10 * e + k);
}

static void *move_peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    float w[EXPERTS * LEN], v[EXPERTS * LEN], want;
    void *buffers[2];
    size_t d, e, k, moves = 0, b;
    (void)arg;

    d = comm_rank(comm);
    for (e = 0; e < EXPERTS; e++) {
        for (k = 0; k < LEN; k++) {
            w[e * LEN + k] = NOW[e] == d ? value(0, e, k) : -1.0f;
            v[e * LEN + k] = NOW[e] == d ? value(1, e, k) : -1.0f;
        }
    }
    buffers[0] = w;
    buffers[1] = v;
    EXPECT_STATUS(phx_moe_reshard_move(comm, EXPERTS, NOW, NEXT, 2, buffers, EXPERTS * LEN - 1, PHX_DTYPE_F32, NULL),
                  PHX_ERR_INVALID_ARGUMENT);
    CHECK(phx_moe_reshard_move(comm, EXPERTS, NOW, NEXT, 2, buffers, EXPERTS * LEN, PHX_DTYPE_F32, &moves));
    EXPECT(moves == 4);
    for (e = 0; e < EXPERTS; e++) {
        if (NOW[e] != d && NEXT[e] != d) continue;
        for (k = 0; k < LEN; k++) {
            for (b = 0; b < 2; b++) {
                want = value(b, e, k);
                EXPECT(memcmp(b == 0 ? &w[e * LEN + k] : &v[e * LEN + k], &want, sizeof want) == 0);
            }
        }
    }
    CHECK(phx_comm_leave(comm));
    printf("move ok rank=%zu\n", d);
    return NULL;
}

int main(void) {
    uint64_t capacities[N] = {64, 64, 64, 64}, bytes[2] = {8, 8}, small[N] = {8, 8, 8, 8};
    size_t experts[2] = {EXPERTS, EXPERTS}, owners[2 * EXPERTS], backups[2 * EXPERTS], after[2 * EXPERTS];
    size_t per_device[N] = {0, 0, 0, 0}, e, keep, lost;
    double loads[2 * EXPERTS] = {0};
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* The worked example's sharding. */
    CHECK(phx_moe_plan_sharding(N, capacities, 1, experts, bytes, NULL, owners));
    for (e = 0; e < EXPERTS; e++) EXPECT(owners[e] == NOW[e]);
    /* Two layers, the second with experts 0 and 1 hot: they land on different devices. */
    for (e = 0; e < EXPERTS; e++) loads[EXPERTS + e] = e < 2 ? 40.0 : 5.0;
    CHECK(phx_moe_plan_sharding(N, capacities, 2, experts, bytes, loads, owners));
    EXPECT(owners[EXPERTS] != owners[EXPERTS + 1]);
    memcpy(after, owners, sizeof owners);
    EXPECT_STATUS(phx_moe_plan_sharding(N, small, 2, experts, bytes, NULL, owners), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(memcmp(after, owners, sizeof owners) == 0);
    EXPECT_STATUS(phx_moe_plan_sharding(N, capacities, 1, experts, bytes, NULL, NULL), PHX_ERR_NULL);

    /* Backups: never on the owner, two per device in each layer. */
    CHECK(phx_moe_plan_backups(N, 2, experts, bytes, owners, NULL, backups));
    for (e = 0; e < 2 * EXPERTS; e++) {
        EXPECT(backups[e] != owners[e] && backups[e] < N);
        if (e < EXPERTS) per_device[backups[e]]++;
    }
    for (e = 0; e < N; e++) EXPECT(per_device[e] == 2);
    EXPECT_STATUS(phx_moe_plan_backups(1, 1, experts, bytes, after, NULL, backups), PHX_ERR_INVALID_ARGUMENT);

    /* After a loss: each lost expert to its backup, the devices after it renumbered. */
    for (lost = 0; lost < N; lost++) {
        CHECK(phx_moe_after_loss(N, 2, experts, bytes, owners, backups, lost, after));
        for (e = 0; e < 2 * EXPERTS; e++) {
            keep = owners[e] == lost ? backups[e] : owners[e];
            EXPECT(after[e] == (keep > lost ? keep - 1 : keep));
        }
    }
    EXPECT_STATUS(phx_moe_after_loss(N, 2, experts, bytes, owners, backups, N, after), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_moe_after_loss(N, 2, experts, bytes, owners, owners, 0, after), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_moe_reshard_move(NULL, EXPERTS, NOW, NEXT, 0, NULL, 0, PHX_DTYPE_F32, NULL), PHX_ERR_NULL);
    printf("shard ok\n");

    run_peer_threads(SECRET, ADDR, N, move_peer);
    printf("all ok\n");
    return 0;
}

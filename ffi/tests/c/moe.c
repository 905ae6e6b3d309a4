/*
 * Expert parallelism (FSSDP) from C, one process, no group: run by tests/c_moe.rs.
 *
 * phx_moe_place on the reference's worked example (4 devices, 8 experts, t = m = 2)
 * gives the `holds` matrix of the sparse collectives: e0 and e4 on every device, the
 * others on their owners only, 6 transfers; a bad owner is refused. phx_moe_simulate on
 * 8 devices, 32 experts, Zipf s = 1.2 meets the targets (FSSDP's straggler at
 * most 0.6 of EP's, its traffic at most 0.5 of FSDP's) and FSDP's figures are exact.
 * Prints "moe ok ..." on success; failures print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

enum { N = 4, EXPERTS = 8 };

int main(void) {
    size_t owners[EXPERTS], e, d, transfers = 0;
    double loads[EXPERTS] = {40, 5, 10, 5, 20, 5, 10, 5};
    uint8_t holds[EXPERTS * N];
    phx_moe_sim_result r;
    double mib = 1024.0 * 1024.0, expert = 16.0 * mib, straggler, traffic;

    for (e = 0; e < EXPERTS; e++) owners[e] = e / 2;
    CHECK(phx_moe_place(N, EXPERTS, owners, loads, 2, 2, NULL, holds));
    for (e = 0; e < EXPERTS; e++) {
        for (d = 0; d < N; d++) {
            EXPECT(holds[e * N + d] == (uint8_t)(e == 0 || e == 4 || d == owners[e]));
            transfers += holds[e * N + d];
        }
    }
    transfers -= EXPERTS;
    EXPECT(transfers == 6);
    owners[3] = 4;
    memset(holds, 7, sizeof holds);
    EXPECT_STATUS(phx_moe_place(N, EXPERTS, owners, loads, 2, 2, NULL, holds), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "device 4") != NULL);
    EXPECT(holds[0] == 7); /* untouched on error */
    EXPECT_STATUS(phx_moe_place(N, EXPERTS, NULL, loads, 2, 2, NULL, holds), PHX_ERR_NULL);

    CHECK(phx_moe_simulate(8, 32, 1.2, 4096, 20, 2, 2, 1, (uint64_t)expert, 2048, &r));
    EXPECT(r.fsdp.straggler == 4096.0);
    EXPECT(r.fsdp.param_bytes == 2.0 * 32 * 7 * expert && r.fsdp.token_bytes == 0.0);
    EXPECT(r.ep.param_bytes == 0.0 && r.ep.max_memory == 4 * expert);
    straggler = r.fssdp.straggler / r.ep.straggler;
    traffic = (r.fssdp.param_bytes + r.fssdp.token_bytes) / (r.fsdp.param_bytes + r.fsdp.token_bytes);
    EXPECT(straggler <= 0.6 && traffic <= 0.5);
    EXPECT_STATUS(phx_moe_simulate(0, 32, 1.2, 4096, 20, 2, 2, 1, 1, 1, &r), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_moe_simulate(8, 32, 1.2, 4096, 20, 2, 2, 1, 1, 1, NULL), PHX_ERR_NULL);
    printf("moe ok straggler=%.3f traffic=%.3f\n", straggler, traffic);
    return 0;
}

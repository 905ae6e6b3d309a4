#include <stdio.h>
#include "phalanx.h"

/* Reports a failed call; returns non-zero when it failed. */
static int failed(int status, const char *what) {
    if (status != PHX_OK)
        fprintf(stderr, "%s: %s: %s\n", what, phx_status_name(status), phx_last_error());
    return status != PHX_OK;
}

int main(int argc, char **argv) {
    const char *secret = "the cluster secret (use 32 random bytes)";
    phx_master *master = NULL; /* only when this process runs the master */
    phx_comm *comm = NULL;
    char addr[PHX_ADDR_BUF_LEN];
    int steps = 0;

    if (argc > 1) { /* join the master at argv[1], e.g. 10.0.0.1:7000 */
        snprintf(addr, sizeof addr, "%s", argv[1]);
    } else if (failed(phx_master_start("127.0.0.1:0", secret, 0, &master), "master") ||
               failed(phx_master_addr(master, addr, sizeof addr), "master address")) {
        return 1;
    }
    /* Blocks until admitted; a collective that loses a peer is tried up to 3 times. */
    if (failed(phx_comm_connect(addr, secret, 3, &comm), "connect")) {
        phx_master_free(master);
        return 1;
    }
    while (steps < 3) {
        float grad[4] = {1.0f, 2.0f, 3.0f, 4.0f}; /* your backward pass */
        size_t size = 0;
        int status;
        if (failed(phx_comm_update_topology(comm), "update_topology")) /* admit joiners */
            break;
        status = phx_comm_all_reduce(comm, grad, 4, PHX_DTYPE_F32, PHX_OP_AVG);
        if (status == PHX_ERR_PEER_LOST || status == PHX_ERR_ABORTED)
            continue; /* grad holds its old values: retry in the next view */
        if (failed(status, "all_reduce") || failed(phx_comm_size(comm, &size), "size"))
            break;
        printf("step %d: %zu peer(s), mean grad[3] = %g\n", steps, size, grad[3]);
        steps++;
    }
    phx_comm_leave(comm);   /* the others see a new view at once */
    phx_master_free(master); /* NULL is fine */
    return steps == 3 ? 0 : 1;
}

/*
 * Expert parallelism (FSSDP) from C, one process: run by tests/c_moe.rs.
 *
 * Without a group: phx_moe_place on the reference's worked example (4 devices, 8
 * experts, t = m = 2) gives the `holds` matrix of the sparse collectives: e0 and e4 on
 * every device, the others on their owners only, 6 transfers; a bad owner is refused.
 * phx_moe_simulate on 8 devices, 32 experts, Zipf s = 1.2 meets the issue's targets
 * (FSSDP's straggler at most 0.6 of EP's, its traffic at most 0.5 of FSDP's) and FSDP's
 * figures are exact.
 *
 * Then the layer (phx_moe_layer) on a group of four peers on threads (a master in this
 * process, QUIC on 127.0.0.1), the worked example again: after materialize every
 * holder's bytes equal the owner's; dispatch sends every token to a holder of its expert
 * and the devices compute 20, 30, 20 and 30 tokens (EP: 45, 15, 25, 15); combine brings
 * back exactly what one device computes alone (and 8-byte tokens unchanged through
 * identity experts); after reduce_gradients d0 holds [10, 10] for e0 and d2 [50, 10]
 * for e4, every other slot unchanged. Argument errors are refused before anything is
 * sent. Then the started steps (phx_moe_step), the link counters (phx_comm_traffic) and
 * re-materialisation, and a device lost before a started step (see started_steps).
 *
 * Prints "moe ok ...", one "layer ok rank=R" per peer and "all ok" on success; failures
 * print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

enum { N = 4, EXPERTS = 8 };

static const char *SECRET = "phalanx-ffi-moe-secret-0123456789";
static char ADDR[PHX_ADDR_BUF_LEN];

/* Tokens of each expert on each device: a quarter of e0's 40 and e4's 20 on every
 * device, the others on one device each, some away from their owner. */
static const size_t ROUTED[N][EXPERTS] = {
    {10, 0, 0, 5, 5, 0, 10, 0}, {10, 5, 10, 0, 5, 0, 0, 0}, {10, 0, 0, 0, 5, 5, 0, 5}, {10, 0, 0, 0, 5, 0, 0, 0}};

/* W_e = [10e + 1, 10e + 2]. */
static float weight(size_t e, size_t k) {
    return 10.0f * (float)e + 1.0f + (float)k;
}

static int same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* The started steps, the link counters and re-materialisation, after the blocking
 * steps: a started spAG and spRS, with compute meanwhile, equal the blocking ones bit
 * for bit; the counters see the spAG receive exactly its experts (1 or 2 of 8 bytes per
 * device, 6 in all); release keeps the owned experts (12 of 16 floats freed) and the
 * re-materialising spAG gives the materialised bytes back. Last, device 3 leaves
 * instead of starting a step: the survivors get PEER_LOST or ABORTED, and the buffer
 * written at wait is exactly the one passed at start. */
static void started_steps(phx_moe_layer *layer, phx_comm *comm, size_t d, const size_t *owners,
                          const uint8_t *holds) {
    float params[2 * EXPERTS], blocking[2 * EXPERTS], started[2 * EXPERTS], owned[2 * EXPERTS];
    float again[2 * EXPERTS], before_loss[2 * EXPERTS];
    phx_moe_step *step = NULL;
    phx_traffic before, after, peers[N], sum;
    uint64_t ids[N];
    size_t e, i, k, n_peers = 0, owned_len = 0, replica_len = 0, freed = 0;
    int finished = -1, status;
    volatile double acc = 0.0;

    for (e = 0; e < EXPERTS; e++)
        for (k = 0; k < 2; k++) params[2 * e + k] = owners[e] == d ? weight(e, k) : -1.0f - (float)d;
    memcpy(blocking, params, sizeof params);
    CHECK(phx_moe_layer_materialize(layer, comm, blocking, 2 * EXPERTS, PHX_DTYPE_F32));

    /* Snapshots between two barriers (which carry no payload): the group is quiet. */
    CHECK(phx_comm_barrier(comm));
    CHECK(phx_comm_traffic(comm, &before, NULL, NULL, NULL, 0));
    CHECK(phx_comm_barrier(comm));
    EXPECT_STATUS(phx_moe_layer_materialize_start(layer, comm, params, 2 * EXPERTS - 1, PHX_DTYPE_F32, &step),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(step == NULL);
    CHECK(phx_moe_layer_materialize_start(layer, comm, params, 2 * EXPERTS, PHX_DTYPE_F32, &step));
    params[0] = 12345.0f; /* the step owns a copy: the caller's buffer is free at once */
    for (i = 0; i < 100000; i++) acc += (double)i * 0.5; /* the attention forward */
    CHECK(phx_moe_step_is_finished(step, &finished));
    EXPECT(finished == 0 || finished == 1);
    CHECK(phx_moe_step_wait(step, started, 2 * EXPERTS));
    EXPECT(same_bits(started, blocking, 2 * EXPERTS));
    CHECK(phx_comm_barrier(comm));
    CHECK(phx_comm_traffic(comm, &after, &n_peers, ids, peers, N));
    CHECK(phx_comm_barrier(comm));
    EXPECT(n_peers == N - 1);
    memset(&sum, 0, sizeof sum);
    for (i = 0; i < n_peers; i++) {
        EXPECT(i == 0 || ids[i - 1] < ids[i]);
        sum.frames_sent += peers[i].frames_sent;
        sum.bytes_sent += peers[i].bytes_sent;
        sum.frames_received += peers[i].frames_received;
        sum.bytes_received += peers[i].bytes_received;
    }
    EXPECT(memcmp(&sum, &after, sizeof sum) == 0);
    /* d0 receives e4, d1 e0 and e4, d2 e0, d3 e0 and e4: 8 bytes each. */
    EXPECT(after.bytes_received - before.bytes_received == (d % 2 ? 2 : 1) * 2 * sizeof(float));
    EXPECT(after.frames_received > before.frames_received);
    CHECK(phx_comm_traffic(comm, NULL, NULL, NULL, NULL, 0));
    EXPECT_STATUS(phx_comm_traffic(NULL, &after, NULL, NULL, NULL, 0), PHX_ERR_NULL);

    /* spRS started against blocking: the same bits. */
    for (e = 0; e < EXPERTS; e++) params[2 * e] = params[2 * e + 1] = (float)(e + 1) / (float)(d + 3);
    memcpy(blocking, params, sizeof params);
    CHECK(phx_moe_layer_reduce_gradients(layer, comm, blocking, 2 * EXPERTS, PHX_DTYPE_F32));
    CHECK(phx_moe_layer_reduce_gradients_start(layer, comm, params, 2 * EXPERTS, PHX_DTYPE_F32, &step));
    for (i = 0; i < 100000; i++) acc += (double)i * 0.25; /* the attention backward */
    EXPECT_STATUS(phx_moe_step_wait(step, again, 2 * EXPERTS - 1), PHX_ERR_INVALID_ARGUMENT); /* consumed */
    CHECK(phx_moe_layer_reduce_gradients_start(layer, comm, params, 2 * EXPERTS, PHX_DTYPE_F32, &step));
    CHECK(phx_moe_step_wait(step, again, 2 * EXPERTS));
    EXPECT(!same_bits(again, params, 2 * EXPERTS) || d % 2 == 1);
    /* The second spRS started from the same gradients: the same bits as the blocking one. */
    EXPECT(same_bits(again, blocking, 2 * EXPERTS));
    CHECK(phx_moe_step_free(NULL));
    EXPECT_STATUS(phx_moe_step_wait(NULL, again, 2 * EXPERTS), PHX_ERR_NULL);

    /* Re-materialisation: release after the forward, spAG again before the backward. */
    CHECK(phx_moe_layer_owned_len(layer, d, &owned_len));
    CHECK(phx_moe_layer_replica_len(layer, d, &replica_len));
    EXPECT(owned_len == 4 && replica_len == (d % 2 ? 4u : 2u));
    EXPECT_STATUS(phx_moe_layer_release_replicas(layer, comm, started, 2 * EXPERTS, PHX_DTYPE_F32, owned, 3, &freed),
                  PHX_ERR_INVALID_ARGUMENT);
    CHECK(phx_moe_layer_release_replicas(layer, comm, started, 2 * EXPERTS, PHX_DTYPE_F32, owned, owned_len, &freed));
    EXPECT(freed == (2 * EXPERTS - owned_len) * sizeof(float));
    EXPECT(same_bits(owned, &started[4 * d], 4)); /* d owns experts 2d and 2d + 1 */
    CHECK(phx_moe_layer_rematerialize_start(layer, comm, owned, owned_len, PHX_DTYPE_F32, &step));
    CHECK(phx_moe_step_wait(step, again, 2 * EXPERTS));
    for (e = 0; e < EXPERTS; e++) {
        if (holds[e * N + d]) EXPECT(same_bits(&again[2 * e], &started[2 * e], 2));
        else EXPECT(again[2 * e] == 0.0f && again[2 * e + 1] == 0.0f);
    }

    /* A started dispatch and combine against the blocking ones: the same rows. */
    {
        size_t experts[64], n = 0, count = 0, started_count = 0;
        float tokens[128], back[128];
        const float *rows, *started_rows;
        const size_t *rows_experts, *started_experts;
        phx_moe_dispatched *blocking_got = NULL, *got = NULL;
        phx_moe_dispatch_request *dreq = NULL;
        phx_moe_combine_request *creq = NULL;
        for (e = 0; e < EXPERTS; e++)
            for (k = 0; k < ROUTED[d][e]; k++) experts[n++] = e;
        for (i = 0; i < 2 * n; i++) tokens[i] = (float)(1000 * d + i) / 7.0f;
        CHECK(phx_moe_layer_dispatch(layer, comm, tokens, experts, n, PHX_DTYPE_F32, &blocking_got));
        experts[0] = EXPERTS; /* refused before anything starts */
        EXPECT_STATUS(phx_moe_layer_dispatch_start(layer, comm, tokens, experts, n, PHX_DTYPE_F32, &dreq),
                      PHX_ERR_INVALID_ARGUMENT);
        EXPECT(dreq == NULL);
        experts[0] = 0;
        CHECK(phx_moe_layer_dispatch_start(layer, comm, tokens, experts, n, PHX_DTYPE_F32, &dreq));
        memset(tokens, 0, sizeof tokens); /* the request owns a copy */
        for (i = 0; i < 100000; i++) acc += (double)i * 0.125; /* compute meanwhile */
        CHECK(phx_moe_dispatch_request_is_finished(dreq, &finished));
        EXPECT(finished == 0 || finished == 1);
        CHECK(phx_moe_dispatch_request_wait(dreq, &got));
        CHECK(phx_moe_dispatched_count(blocking_got, &count));
        CHECK(phx_moe_dispatched_count(got, &started_count));
        EXPECT(count == started_count);
        CHECK(phx_moe_dispatched_tokens(blocking_got, (const void **)&rows));
        CHECK(phx_moe_dispatched_tokens(got, (const void **)&started_rows));
        CHECK(phx_moe_dispatched_experts(blocking_got, &rows_experts));
        CHECK(phx_moe_dispatched_experts(got, &started_experts));
        EXPECT(count == 0 || (same_bits(rows, started_rows, 2 * count) &&
                              memcmp(rows_experts, started_experts, count * sizeof(size_t)) == 0));
        /* Identity experts: every token comes back, in its place. */
        CHECK(phx_moe_layer_combine_start(layer, comm, got, started_rows, 2 * count, &creq));
        CHECK(phx_moe_dispatched_free(got));
        for (i = 0; i < 100000; i++) acc += (double)i * 0.0625;
        CHECK(phx_moe_combine_request_is_finished(creq, &finished));
        EXPECT(finished == 0 || finished == 1);
        CHECK(phx_moe_combine_request_wait(creq, back, 2 * n));
        for (i = 0; i < 2 * n; i++) tokens[i] = (float)(1000 * d + i) / 7.0f;
        EXPECT(same_bits(back, tokens, 2 * n));
        CHECK(phx_moe_dispatched_free(blocking_got));
        CHECK(phx_moe_dispatch_request_free(NULL));
        CHECK(phx_moe_combine_request_free(NULL));
        EXPECT_STATUS(phx_moe_dispatch_request_wait(NULL, &got), PHX_ERR_NULL);
    }

    /* A lost device: 3 leaves instead of starting the spAG. */
    if (d == 3) {
        CHECK(phx_comm_leave(comm));
        return;
    }
    for (i = 0; i < 2 * EXPERTS; i++) before_loss[i] = (float)i + 0.25f * (float)d;
    memcpy(params, before_loss, sizeof params);
    memset(again, 0, sizeof again);
    status = phx_moe_layer_materialize_start(layer, comm, params, 2 * EXPERTS, PHX_DTYPE_F32, &step);
    if (status == PHX_OK) status = phx_moe_step_wait(step, again, 2 * EXPERTS);
    else memcpy(again, params, sizeof params); /* refused at start: nothing began */
    EXPECT(status == PHX_ERR_PEER_LOST || status == PHX_ERR_ABORTED);
    EXPECT(same_bits(again, before_loss, 2 * EXPERTS));
    (void)acc;
    CHECK(phx_comm_leave(comm));
}

static void *layer_peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    phx_moe_layer *layer = NULL, *bad = NULL;
    phx_moe_dispatched *got = NULL;
    size_t owners[EXPERTS], experts[64], left[EXPERTS], d, e, i, k, n = 0, count = 0, params_len = 0, bad_owners[EXPERTS];
    double loads[EXPERTS] = {40, 5, 10, 5, 20, 5, 10, 5};
    uint8_t holds[EXPERTS * N];
    float params[2 * EXPERTS], grads[2 * EXPERTS], tokens[128], outputs[128], combined[128], want[2], kf;
    const float *arrived;
    const size_t *arrived_experts, *sources;
    uint64_t compute[N];
    (void)arg;

    d = comm_rank(comm);
    for (e = 0; e < EXPERTS; e++) owners[e] = e / 2;
    CHECK(phx_moe_place(N, EXPERTS, owners, loads, 2, 2, NULL, holds));
    CHECK(phx_moe_layer_new(N, EXPERTS, owners, holds, 2, 2, NULL, &layer));
    CHECK(phx_moe_layer_params_len(layer, &params_len));
    EXPECT(params_len == 2 * EXPERTS);
    memcpy(bad_owners, owners, sizeof owners);
    bad_owners[7] = N;
    EXPECT_STATUS(phx_moe_layer_new(N, EXPERTS, bad_owners, holds, 2, 2, NULL, &bad), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(bad == NULL);
    EXPECT_STATUS(phx_moe_layer_new(N, EXPERTS, owners, holds, 2, 0, NULL, &bad), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_moe_layer_new(N, EXPERTS, owners, holds, 2, 2, NULL, NULL), PHX_ERR_NULL);

    /* spAG: owned slots hold the weights, the others garbage. */
    for (e = 0; e < EXPERTS; e++)
        for (k = 0; k < 2; k++) params[2 * e + k] = owners[e] == d ? weight(e, k) : -1.0f - (float)d;
    CHECK(phx_moe_layer_materialize(layer, comm, params, 2 * EXPERTS, PHX_DTYPE_F32));
    for (e = 0; e < EXPERTS; e++) {
        want[0] = weight(e, 0);
        want[1] = weight(e, 1);
        if (holds[e * N + d]) EXPECT(same_bits(&params[2 * e], want, 2));
        else EXPECT(params[2 * e] == -1.0f - (float)d);
    }

    /* Dispatch this device's tokens, interleaved by expert so the layer must regroup. */
    memcpy(left, ROUTED[d], sizeof left);
    for (;;) {
        size_t before = n;
        for (e = 0; e < EXPERTS; e++)
            if (left[e] > 0) {
                left[e]--;
                experts[n++] = e;
            }
        if (n == before) break;
    }
    for (i = 0; i < n; i++) {
        tokens[2 * i] = (float)(100 * d + i);
        tokens[2 * i + 1] = -0.5f * (float)(100 * d + i);
    }
    experts[0] = EXPERTS; /* an expert the layer does not have: refused, nothing sent */
    EXPECT_STATUS(phx_moe_layer_dispatch(layer, comm, tokens, experts, n, PHX_DTYPE_F32, &got),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(got == NULL);
    experts[0] = 0;
    CHECK(phx_moe_layer_dispatch(layer, comm, tokens, experts, n, PHX_DTYPE_F32, &got));
    CHECK(phx_moe_dispatched_count(got, &count));
    CHECK(phx_moe_dispatched_compute(got, compute, N));
    EXPECT(compute[0] == 20 && compute[1] == 30 && compute[2] == 20 && compute[3] == 30);
    EXPECT(count == compute[d]);
    EXPECT_STATUS(phx_moe_dispatched_compute(got, compute, N - 1), PHX_ERR_INVALID_ARGUMENT);
    CHECK(phx_moe_dispatched_tokens(got, (const void **)&arrived));
    CHECK(phx_moe_dispatched_experts(got, &arrived_experts));
    CHECK(phx_moe_dispatched_sources(got, &sources));
    for (i = 0; i < count; i++) {
        e = arrived_experts[i];
        EXPECT(e < EXPERTS && holds[e * N + d]);
        EXPECT(sources[i] < N && (i == 0 || sources[i - 1] <= sources[i]));
        /* The expert: elementwise product with the materialised weights. */
        outputs[2 * i] = arrived[2 * i] * params[2 * e];
        outputs[2 * i + 1] = arrived[2 * i + 1] * params[2 * e + 1];
    }
    EXPECT_STATUS(phx_moe_layer_combine(layer, comm, got, outputs, 2 * count, combined, 2 * n - 2),
                  PHX_ERR_INVALID_ARGUMENT);
    CHECK(phx_moe_layer_combine(layer, comm, got, outputs, 2 * count, combined, 2 * n));
    for (i = 0; i < n; i++) {
        want[0] = tokens[2 * i] * weight(experts[i], 0);
        want[1] = tokens[2 * i + 1] * weight(experts[i], 1);
        EXPECT(same_bits(&combined[2 * i], want, 2));
    }
    CHECK(phx_moe_dispatched_free(got));

    /* The same routing with 8-byte elements (double tokens), through identity experts:
     * every token comes back bit for bit, in its place. */
    {
        double wide[128], wide_back[128];
        const double *wide_arrived;
        size_t wide_count = 0;
        for (i = 0; i < 2 * n; i++) wide[i] = 1.0 / (double)(1 + i + 1000 * d);
        CHECK(phx_moe_layer_dispatch(layer, comm, wide, experts, n, PHX_DTYPE_F64, &got));
        CHECK(phx_moe_dispatched_count(got, &wide_count));
        EXPECT(wide_count == count);
        CHECK(phx_moe_dispatched_tokens(got, (const void **)&wide_arrived));
        CHECK(phx_moe_layer_combine(layer, comm, got, wide_arrived, 2 * wide_count, wide_back, 2 * n));
        EXPECT(memcmp(wide, wide_back, 2 * n * sizeof(double)) == 0);
        CHECK(phx_moe_dispatched_free(got));
    }

    /* spRS: g_{d,e0} = (d+1)[1,1], g_{d,e4} = (d+1)[5,1], every other slot e. */
    kf = (float)(d + 1);
    for (e = 0; e < EXPERTS; e++) grads[2 * e] = grads[2 * e + 1] = (float)e;
    grads[0] = grads[1] = kf;
    grads[8] = 5.0f * kf;
    grads[9] = kf;
    /* A buffer of the wrong length is refused by every device alike, unchanged (before
     * the last collective: once a peer has left, the view check would come first). */
    EXPECT_STATUS(phx_moe_layer_reduce_gradients(layer, comm, grads, 2 * EXPERTS - 1, PHX_DTYPE_F32),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(grads[0] == kf && grads[8] == 5.0f * kf);
    CHECK(phx_moe_layer_reduce_gradients(layer, comm, grads, 2 * EXPERTS, PHX_DTYPE_F32));
    for (e = 0; e < EXPERTS; e++) {
        if (e == 0) {
            EXPECT(d == 0 ? grads[0] == 10.0f && grads[1] == 10.0f : grads[0] == kf && grads[1] == kf);
        } else if (e == 4) {
            EXPECT(d == 2 ? grads[8] == 50.0f && grads[9] == 10.0f : grads[8] == 5.0f * kf && grads[9] == kf);
        } else {
            EXPECT(grads[2 * e] == (float)e && grads[2 * e + 1] == (float)e);
        }
    }
    started_steps(layer, comm, d, owners, holds);
    CHECK(phx_moe_layer_free(layer));
    CHECK(phx_moe_layer_free(NULL));
    CHECK(phx_moe_dispatched_free(NULL));
    printf("layer ok rank=%zu\n", d);
    return NULL;
}

int main(void) {
    size_t owners[EXPERTS], e, d, transfers = 0;
    double loads[EXPERTS] = {40, 5, 10, 5, 20, 5, 10, 5};
    uint8_t holds[EXPERTS * N];
    phx_moe_sim_result r;
    double mib = 1024.0 * 1024.0, expert = 16.0 * mib, straggler, traffic;
    setvbuf(stdout, NULL, _IOLBF, 0);

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
    run_peer_threads(SECRET, ADDR, N, layer_peer);
    printf("all ok\n");
    return 0;
}

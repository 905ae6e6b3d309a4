/*
 * The C API from C: one program, several roles, run as separate processes on
 * 127.0.0.1 by tests/c_programs.rs.
 *
 *   harness master SECRET
 *       runs a master, prints "addr HOST:PORT", serves until stdin closes.
 *   harness collectives ADDR SECRET N
 *       forms a group of N and checks every collective's exact result, the non-blocking
 *       all-reduce, and the argument checks.
 *   harness steps ADDR SECRET N WEIGHT EXIT_AT RETRY
 *       forms a group of N, then all-reduces WEIGHT * (i % 7 + 1) every step; with
 *       EXIT_AT >= 0 it exits abruptly (_exit) at the top of step EXIT_AT, while the
 *       others are entering the all-reduce. Survivors retry (inside the all-reduce with
 *       RETRY > 1 attempts, else by calling update_topology and the all-reduce again)
 *       and print each step's sum.
 *   harness state ADDR SECRET N WEIGHT JOINER
 *       a training loop with shared state: N members form a group and step; a JOINER
 *       (1) starts with zeroed tensors, joins mid-run, and fetches the state.
 *
 * Every line of output is one event; failures print "FAIL ..." and exit 1.
 */
#include "peer_common.h"

#include <unistd.h>

/* form_group, then the "ready" event. */
static void form_group_ready(phx_comm *comm, size_t n) {
    form_group(comm, n);
    printf("ready rank=%zu size=%zu\n", comm_rank(comm), comm_size(comm));
}

static void hex(const uint8_t *bytes, size_t len, char *out) {
    size_t i;
    for (i = 0; i < len; i++) sprintf(out + 2 * i, "%02x", bytes[i]);
}

/* ------------------------------------------------------------------------------------ */

static int run_master(const char *secret) {
    phx_master *master = master_start(secret);
    char tiny[4];
    EXPECT_STATUS(phx_master_addr(master, tiny, sizeof tiny), PHX_ERR_BUFFER_TOO_SMALL);
    return master_serve(master);
}

/* ------------------------------------------------------------------------------------ */

enum { M = 257 }; /* elements per rank: not a multiple of anything convenient */

static void check_argument_errors(phx_comm *comm, size_t n) {
    int32_t small[4] = {0};
    static int64_t in[17 * M], out[M];
    size_t size = 0;
    EXPECT_STATUS(phx_comm_all_reduce(comm, small, 4, 12, PHX_OP_SUM), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "dtype") != NULL);
    EXPECT_STATUS(phx_comm_all_reduce(comm, small, 4, PHX_DTYPE_I32, -1), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_reduce(NULL, small, 4, PHX_DTYPE_I32, PHX_OP_SUM), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_all_reduce(comm, NULL, 4, PHX_DTYPE_I32, PHX_OP_SUM), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_all_reduce(comm, small, SIZE_MAX / 2, PHX_DTYPE_I32, PHX_OP_SUM),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_size(comm, NULL), PHX_ERR_NULL);
    EXPECT_STATUS(phx_comm_broadcast(comm, small, 4, PHX_DTYPE_I32, n), PHX_ERR_INVALID_ARGUMENT);
    /* Counts that do not fit the group, and overlapping buffers: refused before anything
     * is sent, so the other members are not disturbed. */
    EXPECT_STATUS(phx_comm_reduce_scatter(comm, in, n * M + 1, out, M, PHX_DTYPE_I64, PHX_OP_SUM),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_comm_all_gather(comm, in, 2, in + 1, 2 * n, PHX_DTYPE_I64),
                  PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "overlap") != NULL);
    EXPECT_STATUS(phx_comm_sync_shared_state(comm, NULL, PHX_SYNC_ENFORCE_POPULAR, NULL), PHX_ERR_NULL);
    /* A standby list that does not parse is refused before any connection is made. */
    {
        phx_connect_options options;
        phx_comm *other = NULL;
        CHECK(phx_connect_options_init(&options));
        EXPECT(options.standby_masters == NULL && options.rejoin_ms == 0);
        EXPECT(options.shared_memory == PHX_SHM_AUTO);
        options.standby_masters = "127.0.0.1:7001, not-an-address";
        EXPECT_STATUS(phx_comm_connect_with("127.0.0.1:9", &options, &other), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(strstr(phx_last_error(), "standby_masters") != NULL);
        EXPECT(other == NULL);
        /* An unknown shared-memory mode is refused the same way. */
        options.standby_masters = NULL;
        options.shared_memory = 7;
        EXPECT_STATUS(phx_comm_connect_with("127.0.0.1:9", &options, &other), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(strstr(phx_last_error(), "shared_memory") != NULL);
        EXPECT(other == NULL);
    }
    /* Pipeline schedules: the reference's worked example, and a typed refusal. */
    {
        const double unit[4] = {1, 1, 1, 0};
        phx_pipeline_result r;
        CHECK(phx_pipeline_simulate("zbh1", 4, 8, 0, unit, 0, &r));
        EXPECT(r.iteration == 27 && r.bubble == 3 && r.peak_memory == 4);
        CHECK(phx_pipeline_simulate("zbv", 4, 8, 0, unit, 4, &r));
        EXPECT(r.bubble == 0 && r.peak_memory == 4);
        /* ZB-2p: the automatic scheduler at 2p; V-Half and V-Min with less memory. */
        CHECK(phx_pipeline_simulate("zb2p", 4, 8, 0, unit, 0, &r));
        EXPECT(r.iteration == 24 && r.bubble == 0 && r.peak_memory == 7);
        CHECK(phx_pipeline_simulate("vhalf", 4, 8, 0, unit, 3, &r));
        EXPECT(r.bubble == 2.5 && r.peak_memory == 3);
        CHECK(phx_pipeline_simulate("vmin", 4, 8, 0, unit, 0, &r));
        EXPECT(r.bubble == 5.5 && r.peak_memory == 2);
        CHECK(phx_pipeline_simulate("auto", 4, 8, 0, unit, 4, &r));
        EXPECT(r.peak_memory <= 4);
        EXPECT_STATUS(phx_pipeline_simulate("auto", 4, 8, 0, unit, 0, &r), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(strstr(phx_last_error(), "needs a memory limit") != NULL);
        EXPECT_STATUS(phx_pipeline_simulate("1f1b", 4, 8, 0, unit, 3, &r), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(strstr(phx_last_error(), "stage 0 holds 4") != NULL);
        EXPECT_STATUS(phx_pipeline_simulate("zbh1", 4, 8, 0, NULL, 0, &r), PHX_ERR_NULL);
    }
    /* A success clears the last error. */
    CHECK(phx_comm_size(comm, &size));
    EXPECT(strcmp(phx_last_error(), "") == 0);
    /* Freeing NULL is fine. */
    CHECK(phx_comm_free(NULL));
    CHECK(phx_pending_free(NULL));
    CHECK(phx_state_free(NULL));
    CHECK(phx_master_free(NULL));
    EXPECT(strcmp(phx_status_name(PHX_ERR_PEER_LOST), "PHX_ERR_PEER_LOST") == 0);
    EXPECT(strlen(phx_version()) >= 5);
}

static int run_collectives(const char *addr, const char *secret, size_t n) {
    phx_comm *comm = connect_to(addr, secret, 0);
    size_t r, i, q, count = 0;
    int32_t a[M];
    double avg[M];
    float mx[M];
    int64_t rs_in[16 * M], rs_out[M];
    uint16_t ag_in[M], ag_out[16 * M];
    uint8_t bc[M];
    int32_t red[M];
    int32_t nb1[M];
    float nb2[M];
    phx_pending *p1 = NULL, *p2 = NULL;
    int finished = 0;
    uint64_t ids[16];

    EXPECT(n <= 16);
    form_group_ready(comm, n);
    r = comm_rank(comm);
    EXPECT(comm_size(comm) == n);
    CHECK(phx_comm_members(comm, ids, 16, &count));
    EXPECT(count == n);
    EXPECT_STATUS(phx_comm_members(comm, ids, n - 1, &count), PHX_ERR_BUFFER_TOO_SMALL);
    EXPECT(count == n);
    check_argument_errors(comm, n);

    /* all-reduce i32 sum: (r+1)(i+1) sums to n(n+1)/2 (i+1). */
    for (i = 0; i < M; i++) a[i] = (int32_t)((r + 1) * (i + 1));
    CHECK(phx_comm_all_reduce(comm, a, M, PHX_DTYPE_I32, PHX_OP_SUM));
    for (i = 0; i < M; i++) EXPECT(a[i] == (int32_t)(n * (n + 1) / 2 * (i + 1)));

    /* all-reduce f64 avg: 2r + i averages to (n-1) + i exactly. */
    for (i = 0; i < M; i++) avg[i] = 2.0 * (double)r + (double)i;
    CHECK(phx_comm_all_reduce(comm, avg, M, PHX_DTYPE_F64, PHX_OP_AVG));
    for (i = 0; i < M; i++) EXPECT(avg[i] == (double)(n - 1) + (double)i);

    /* all-reduce f32 max. */
    for (i = 0; i < M; i++) mx[i] = (float)(r * 10 + i);
    CHECK(phx_comm_all_reduce(comm, mx, M, PHX_DTYPE_F32, PHX_OP_MAX));
    for (i = 0; i < M; i++) EXPECT(mx[i] == (float)((n - 1) * 10 + i));

    /* reduce-scatter i64 sum: input[j] = 1000 r + j; rank r keeps segment r. */
    for (i = 0; i < n * M; i++) rs_in[i] = (int64_t)(1000 * r + i);
    CHECK(phx_comm_reduce_scatter(comm, rs_in, n * M, rs_out, M, PHX_DTYPE_I64, PHX_OP_SUM));
    for (i = 0; i < M; i++) EXPECT(rs_out[i] == (int64_t)(1000 * n * (n - 1) / 2 + n * (r * M + i)));

    /* all-gather u16: rank q contributes 100 q + k. */
    for (i = 0; i < M; i++) ag_in[i] = (uint16_t)(100 * r + i);
    CHECK(phx_comm_all_gather(comm, ag_in, M, ag_out, n * M, PHX_DTYPE_U16));
    for (q = 0; q < n; q++)
        for (i = 0; i < M; i++) EXPECT(ag_out[q * M + i] == (uint16_t)(100 * q + i));

    /* broadcast u8 from rank 1. */
    for (i = 0; i < M; i++) bc[i] = (uint8_t)(r == 1 ? 7 + i : 0);
    CHECK(phx_comm_broadcast(comm, bc, M, PHX_DTYPE_U8, 1));
    for (i = 0; i < M; i++) EXPECT(bc[i] == (uint8_t)(7 + i));

    /* reduce i32 prod to rank 0: prod(r + 2); the others keep their input. */
    for (i = 0; i < M; i++) red[i] = (int32_t)(r + 2);
    CHECK(phx_comm_reduce(comm, red, M, PHX_DTYPE_I32, PHX_OP_PROD, 0));
    for (i = 0; i < M; i++) {
        int32_t want = 1;
        for (q = 0; q < n; q++) want *= (int32_t)(q + 2);
        EXPECT(red[i] == (r == 0 ? want : (int32_t)(r + 2)));
    }

    CHECK(phx_comm_barrier(comm));

    /* Two non-blocking all-reduces in flight; the inputs are copied at start. */
    for (i = 0; i < M; i++) {
        nb1[i] = (int32_t)(r + i);
        nb2[i] = (float)(r * 3);
    }
    CHECK(phx_comm_all_reduce_start(comm, nb1, M, PHX_DTYPE_I32, PHX_OP_SUM, &p1));
    CHECK(phx_comm_all_reduce_start(comm, nb2, M, PHX_DTYPE_F32, PHX_OP_SUM, &p2));
    memset(nb1, 0xff, sizeof nb1);
    while (!finished) {
        CHECK(phx_pending_is_finished(p1, &finished));
        if (!finished) sleep_ms(1);
    }
    CHECK(phx_pending_wait(p1, nb1, M));
    EXPECT_STATUS(phx_pending_wait(p2, nb2, M - 1), PHX_ERR_INVALID_ARGUMENT); /* consumed */
    for (i = 0; i < M; i++) EXPECT(nb1[i] == (int32_t)(n * (n - 1) / 2 + n * i));
    /* A third one, waited on properly. */
    for (i = 0; i < M; i++) nb2[i] = (float)(r * 3);
    CHECK(phx_comm_all_reduce_start(comm, nb2, M, PHX_DTYPE_F32, PHX_OP_SUM, &p2));
    CHECK(phx_pending_wait(p2, nb2, M));
    for (i = 0; i < M; i++) EXPECT(nb2[i] == (float)(3 * n * (n - 1) / 2));

    CHECK(phx_comm_barrier(comm));
    printf("collectives ok rank=%zu size=%zu\n", r, n);
    CHECK(phx_comm_leave(comm));
    return 0;
}

/* ------------------------------------------------------------------------------------ */

enum { S = 1031 };

static int recoverable(int status) {
    return status == PHX_ERR_PEER_LOST || status == PHX_ERR_ABORTED;
}

static int run_steps(const char *addr, const char *secret, size_t n, int32_t weight, int exit_at, int retry) {
    phx_comm *comm = connect_to(addr, secret, retry);
    int32_t buf[S];
    int step = 0, after = 0, failures = 0;
    size_t i;
    int32_t first = 0;

    form_group_ready(comm, n);
    while (after < 3) {
        int status;
        EXPECT(step < 200 && failures < 20);
        status = phx_comm_update_topology(comm);
        if (recoverable(status)) {
            failures++;
            continue;
        }
        CHECK(status);
        if (step == exit_at) {
            printf("exiting abruptly at step %d\n", step);
            fflush(stdout);
            _exit(42);
        }
        for (i = 0; i < S; i++) buf[i] = weight * (int32_t)(i % 7 + 1);
        status = phx_comm_all_reduce(comm, buf, S, PHX_DTYPE_I32, PHX_OP_SUM);
        if (recoverable(status)) {
            printf("attempt failed step=%d status=%s: %s\n", step, phx_status_name(status), phx_last_error());
            for (i = 0; i < S; i++) EXPECT(buf[i] == weight * (int32_t)(i % 7 + 1)); /* restored */
            failures++;
            continue;
        }
        CHECK(status);
        for (i = 0; i < S; i++) EXPECT(buf[i] == buf[0] * (int32_t)(i % 7 + 1));
        if (step == 0) first = buf[0];
        printf("step %d sum=%d size=%zu\n", step, buf[0], comm_size(comm));
        if (buf[0] != first) after++;
        step++;
    }
    /* Nobody leaves before everyone has read its last step's size. */
    CHECK(phx_comm_barrier(comm));
    printf("survivor done\n");
    CHECK(phx_comm_leave(comm));
    return 0;
}

/* ------------------------------------------------------------------------------------ */

enum { W = 300, B = 3 };

static void print_sync(const char *event, phx_state *state, const phx_sync_report *report, size_t size) {
    uint8_t digest[PHX_DIGEST_LEN];
    char text[2 * PHX_DIGEST_LEN + 1];
    uint64_t revision = 0;
    CHECK(phx_state_digest(state, digest));
    CHECK(phx_state_revision(state, &revision));
    hex(digest, sizeof digest, text);
    printf("%s rev=%llu digest=%s size=%zu received=%zu\n", event, (unsigned long long)revision, text, size,
           report ? report->tensors_received : 0);
}

static int run_state(const char *addr, const char *secret, size_t n, float weight, int joiner) {
    phx_comm *comm = connect_to(addr, secret, 0);
    phx_state *state = NULL;
    float weights[W], grad[W];
    double bias[B];
    size_t i, count = 0;
    int dtype = -1, at_full = 0, steps = 0;

    CHECK(phx_state_new(&state));
    for (i = 0; i < W; i++) weights[i] = joiner ? 0.0f : 0.5f * (float)i;
    for (i = 0; i < B; i++) bias[i] = joiner ? 0.0 : 0.25;
    CHECK(phx_state_insert(state, "weights", weights, W, PHX_DTYPE_F32));
    CHECK(phx_state_insert(state, "bias", bias, B, PHX_DTYPE_F64));
    CHECK(phx_state_info(state, "bias", &dtype, &count));
    EXPECT(dtype == PHX_DTYPE_F64 && count == B);
    EXPECT_STATUS(phx_state_info(state, "nope", &dtype, &count), PHX_ERR_NOT_FOUND);
    EXPECT_STATUS(phx_state_get(state, "bias", bias, B, PHX_DTYPE_F32), PHX_ERR_INVALID_ARGUMENT);
    print_sync("initial", state, NULL, 0);

    if (!joiner) form_group_ready(comm, n);
    /* Members step until three steps have run with the joiner (n + 1 peers); the joiner
     * is admitted at the top of a step and runs those three steps with them. */
    while (at_full < 3) {
        phx_sync_report report;
        size_t size;
        int status;
        EXPECT(steps++ < 3000);
        CHECK(phx_comm_update_topology(comm));
        size = comm_size(comm);
        CHECK(phx_comm_sync_shared_state(comm, state, PHX_SYNC_ENFORCE_POPULAR, &report));
        print_sync("sync", state, &report, size);
        for (i = 0; i < W; i++) grad[i] = weight * (float)(i % 5 + 1);
        status = phx_comm_all_reduce(comm, grad, W, PHX_DTYPE_F32, PHX_OP_SUM);
        CHECK(status);
        CHECK(phx_state_get(state, "weights", weights, W, PHX_DTYPE_F32));
        for (i = 0; i < W; i++) weights[i] += grad[i];
        CHECK(phx_state_insert(state, "weights", weights, W, PHX_DTYPE_F32));
        {
            uint64_t revision = 0;
            CHECK(phx_state_revision(state, &revision));
            CHECK(phx_state_set_revision(state, revision + 1));
        }
        if (size == n + 1) at_full++;
        if (!joiner && size <= n) sleep_ms(20); /* give the joiner time to arrive */
    }
    CHECK(phx_comm_barrier(comm));
    print_sync("final", state, NULL, comm_size(comm));
    CHECK(phx_comm_leave(comm));
    CHECK(phx_state_free(state));
    return 0;
}

/* ------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (is_role(argc, argv, "master", 3)) return run_master(argv[2]);
    if (is_role(argc, argv, "collectives", 5))
        return run_collectives(argv[2], argv[3], (size_t)atoi(argv[4]));
    if (is_role(argc, argv, "steps", 8))
        return run_steps(argv[2], argv[3], (size_t)atoi(argv[4]), (int32_t)atoi(argv[5]), atoi(argv[6]),
                         atoi(argv[7]));
    if (is_role(argc, argv, "state", 7))
        return run_state(argv[2], argv[3], (size_t)atoi(argv[4]), (float)atof(argv[5]), atoi(argv[6]));
    fprintf(stderr, "usage: see the comment at the top of harness.c\n");
    return 2;
}

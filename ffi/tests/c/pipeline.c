/*
 * The pipeline runner from C: one process runs a master and four peers on threads over
 * QUIC on 127.0.0.1; peer of rank r runs stage r.
 *
 * The model: V virtual stages (4, or 8 with two chunks per stage), each an affine map
 * y = a_v x + b_v on vectors of K doubles, with a_v = 1 + v % 2 and b_v = v; micro-batch
 * mb enters as x[i] = mb + 1 + i; the loss is the sum of the last output, so its
 * gradient is all ones. B: dx = a_v dy; W: da_v += dy . x, db_v += sum(dy). Every value
 * is an integer far below 2^53, so the sums are exact whatever the order: each stage's
 * gradients and the loss must equal a serial computation exactly.
 *
 * Each peer runs two iterations of 1F1B (fused backward callback), interleaved 1F1B
 * (2 chunks, fused passes without a fused callback: B then W), ZB-H1 and ZB-V, checks its gradients, the
 * outcome and the timeline after each, and phx_pipeline_finish after each schedule;
 * then two ZB-H1 pipelines of two stages at once, on ranks {3, 1} and {0, 2}
 * (phx_pipeline_runner_set_ranks).
 * Rank 0 checks the argument errors. Then a 1F1B iteration in which stage 1's forward
 * of micro-batch 2 returns 7: stage 1 gets PHX_ERR_STAGE with callback_status 7 and
 * the pass named, and leaves; every other stage gets PEER_LOST or ABORTED.
 * Prints "pipeline ok rank=R" per peer and "all ok". Any failure prints "FAIL ..." and
 * exits 1.
 */
#include "peer_common.h"

enum { N = 4, M = 8, K = 3, MAXV = 8, ITERS = 2 };

static const char *SECRET = "phalanx-ffi-pipeline-secret-0123456789";
static char ADDR[PHX_ADDR_BUF_LEN];

/* One stage's state: per virtual stage, each micro-batch's input and output gradient,
 * and the accumulated gradients. */
typedef struct {
    size_t rank;
    double x[MAXV][M][K];
    double dy[MAXV][M][K];
    double ga[MAXV], gb[MAXV];
    double loss;
    int fail_mb; /* forward of this micro-batch returns 7 (-1: never) */
    int probe;   /* the callbacks report that this stage's run has begun */
    int fused_calls;
} stage_state;

/* The failing iteration: stage 1 fails only once every stage is inside its run (a
 * stage that began after stage 1 left would find another view and refuse to start). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int started = 0;

static void mark_started(stage_state *s) {
    if (!s->probe) return;
    s->probe = 0;
    pthread_mutex_lock(&lock);
    started++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static void wait_all_started(void) {
    pthread_mutex_lock(&lock);
    while (started < N) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
}

static double coef_a(size_t v) { return (double)(1 + v % 2); }
static double coef_b(size_t v) { return (double)v; }

static size_t len_k(void *user, const phx_pipeline_step *step) {
    (void)step;
    mark_started((stage_state *)user);
    return K;
}

static int forward(void *user, const phx_pipeline_step *step, const void *input, size_t input_len, void *output,
                   size_t output_len) {
    stage_state *s = (stage_state *)user;
    const double *in = (const double *)input;
    size_t v = step->virtual_stage, i;
    double y;
    mark_started(s);
    if (s->fail_mb == (int)step->mb) {
        wait_all_started();
        return 7;
    }
    if (step->is_first ? (input != NULL || input_len != 0) : input_len != K) return 1;
    if (step->is_last ? (output != NULL || output_len != 0) : output_len != K) return 2;
    for (i = 0; i < K; i++) {
        s->x[v][step->mb][i] = step->is_first ? (double)(step->mb + 1 + i) : in[i];
        y = coef_a(v) * s->x[v][step->mb][i] + coef_b(v);
        if (step->is_last)
            s->loss += y;
        else
            ((double *)output)[i] = y;
    }
    return 0;
}

static int backward_input(void *user, const phx_pipeline_step *step, const void *grad_out, size_t grad_out_len,
                          void *grad_in, size_t grad_in_len) {
    stage_state *s = (stage_state *)user;
    size_t v = step->virtual_stage, i;
    if (step->is_last ? (grad_out != NULL || grad_out_len != 0) : grad_out_len != K) return 3;
    if (step->is_first ? (grad_in != NULL || grad_in_len != 0) : grad_in_len != K) return 4;
    for (i = 0; i < K; i++) {
        double g = step->is_last ? 1.0 : ((const double *)grad_out)[i];
        s->dy[v][step->mb][i] = g;
        if (!step->is_first) ((double *)grad_in)[i] = coef_a(v) * g;
    }
    return 0;
}

static int backward_weight(void *user, const phx_pipeline_step *step) {
    stage_state *s = (stage_state *)user;
    size_t v = step->virtual_stage, i;
    for (i = 0; i < K; i++) {
        s->ga[v] += s->dy[v][step->mb][i] * s->x[v][step->mb][i];
        s->gb[v] += s->dy[v][step->mb][i];
    }
    return 0;
}

static int fused(void *user, const phx_pipeline_step *step, const void *grad_out, size_t grad_out_len, void *grad_in,
                 size_t grad_in_len) {
    int status = backward_input(user, step, grad_out, grad_out_len, grad_in, grad_in_len);
    ((stage_state *)user)->fused_calls++;
    return status != 0 ? status : backward_weight(user, step);
}

/* The serial model: the loss and every virtual stage's gradients. */
static void expected(size_t vs, double *loss, double *ga, double *gb) {
    double x[MAXV + 1][K], g;
    size_t mb, v, i;
    *loss = 0;
    for (v = 0; v < vs; v++) ga[v] = gb[v] = 0;
    for (mb = 0; mb < M; mb++) {
        for (i = 0; i < K; i++) x[0][i] = (double)(mb + 1 + i);
        for (v = 0; v < vs; v++)
            for (i = 0; i < K; i++) x[v + 1][i] = coef_a(v) * x[v][i] + coef_b(v);
        for (i = 0; i < K; i++) *loss += x[vs][i];
        for (i = 0; i < K; i++) {
            g = 1.0;
            for (v = vs; v-- > 0;) {
                ga[v] += g * x[v][i];
                gb[v] += g;
                g *= coef_a(v);
            }
        }
    }
}

static phx_pipeline_stage callbacks(stage_state *s, int with_fused) {
    phx_pipeline_stage cb;
    cb.dtype = PHX_DTYPE_F64;
    cb.user = s;
    cb.input_len = len_k;
    cb.output_len = len_k;
    cb.forward = forward;
    cb.backward_input = backward_input;
    cb.backward_weight = backward_weight;
    cb.backward = with_fused ? fused : NULL;
    return cb;
}

/* Two iterations of `name` on this stage, each checked exactly. */
static void train(phx_comm *comm, stage_state *s, const char *name, size_t chunks, int kinds, int with_fused) {
    phx_pipeline_runner *runner = NULL;
    phx_pipeline_stage cb = callbacks(s, with_fused);
    phx_pipeline_outcome outcome;
    phx_pipeline_pass passes[4 * M * 2];
    size_t vs = N * chunks, it, v, count = 0, i, c;
    double loss, ga[MAXV], gb[MAXV];
    expected(vs, &loss, ga, gb);
    CHECK(phx_pipeline_runner_new(name, N, M, chunks, NULL, 0.0, s->rank, &runner));
    for (it = 0; it < ITERS; it++) {
        memset(s->ga, 0, sizeof s->ga);
        memset(s->gb, 0, sizeof s->gb);
        s->loss = 0;
        s->fused_calls = 0;
        CHECK(phx_pipeline_run(comm, runner, &cb, &outcome));
        EXPECT(outcome.callback_status == 0 && outcome.failed_pass == -1 && outcome.failed_index == (size_t)-1);
        EXPECT(outcome.seconds > 0 && outcome.span > 0 && outcome.span <= outcome.seconds);
        /* Each stage runs F, B and W (or F and BW) of every micro-batch on each chunk. */
        EXPECT(outcome.passes == (size_t)kinds * M * chunks);
        EXPECT(s->fused_calls == (with_fused ? (int)(M * chunks) : 0));
        for (c = 0; c < chunks; c++) {
            /* Chunk c of stage r holds virtual stage c*N + r, or 2N-1-r on a V's way back. */
            v = strcmp(name, "zbv") == 0 && c == 1 ? 2 * N - 1 - s->rank : c * N + s->rank;
            if (s->ga[v] != ga[v] || s->gb[v] != gb[v]) {
                printf("FAIL %s rank %zu v %zu: ga %.1f want %.1f, gb %.1f want %.1f\n", name, s->rank, v, s->ga[v],
                       ga[v], s->gb[v], gb[v]);
                exit(1);
            }
        }
        /* The last virtual stage is on rank N-1 (rank 0 for ZB-V's V). */
        if (s->rank == (strcmp(name, "zbv") == 0 ? 0u : N - 1u))
            EXPECT(s->loss == loss);
        else
            EXPECT(s->loss == 0);
        EXPECT_STATUS(phx_pipeline_runner_timeline(runner, passes, 1, &count), PHX_ERR_BUFFER_TOO_SMALL);
        EXPECT(count == outcome.passes);
        CHECK(phx_pipeline_runner_timeline(runner, passes, sizeof passes / sizeof passes[0], &count));
        EXPECT(count == outcome.passes);
        for (i = 0; i < count; i++) {
            EXPECT(passes[i].begin <= passes[i].ready && passes[i].ready <= passes[i].computed);
            EXPECT(passes[i].computed <= passes[i].end);
            EXPECT(i == 0 || passes[i - 1].end <= passes[i].begin);
            EXPECT(passes[i].mb < M && passes[i].chunk < chunks);
            EXPECT(kinds == 2 ? (passes[i].pass == PHX_PASS_F || passes[i].pass == PHX_PASS_BW)
                              : passes[i].pass != PHX_PASS_BW);
        }
    }
    CHECK(phx_pipeline_finish(comm, runner));
    CHECK(phx_pipeline_runner_free(runner));
}

/* Two pipelines of two stages share the group: stages on ranks {3, 1} and {0, 2}. */
static void two_pipelines(phx_comm *comm, stage_state *s) {
    static const size_t pipes[2][2] = {{3, 1}, {0, 2}};
    size_t pipe = s->rank == 3 || s->rank == 1 ? 0 : 1, me = pipes[pipe][0] == s->rank ? 0 : 1;
    phx_pipeline_runner *runner = NULL;
    phx_pipeline_stage cb = callbacks(s, 0);
    double loss, ga[MAXV], gb[MAXV];
    expected(2, &loss, ga, gb);
    CHECK(phx_pipeline_runner_new("zbh1", 2, M, 1, NULL, 0.0, me, &runner));
    CHECK(phx_pipeline_runner_set_ranks(runner, pipes[pipe], 2));
    memset(s->ga, 0, sizeof s->ga);
    memset(s->gb, 0, sizeof s->gb);
    s->loss = 0;
    CHECK(phx_pipeline_run(comm, runner, &cb, NULL));
    EXPECT(s->ga[me] == ga[me] && s->gb[me] == gb[me]);
    EXPECT(s->loss == (me == 1 ? loss : 0));
    CHECK(phx_pipeline_finish(comm, runner));
    CHECK(phx_pipeline_runner_free(runner));
}

/* Errors found before anything is sent. */
static void argument_errors(phx_comm *comm, stage_state *s) {
    phx_pipeline_runner *runner = NULL;
    phx_pipeline_stage cb = callbacks(s, 0);
    double bad_costs[4] = {1, 0, 1, 0};
    size_t count = 99;
    EXPECT_STATUS(phx_pipeline_runner_new("gpipe", N, M, 1, NULL, 0.0, 0, &runner), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "gpipe") != NULL);
    EXPECT_STATUS(phx_pipeline_runner_new("1f1b", N, M, 1, NULL, 0.0, N, &runner), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_pipeline_runner_new("1f1b", 1, M, 1, NULL, 0.0, 0, &runner), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_pipeline_runner_new("1f1b", N, M, 1, NULL, 3.0, 0, &runner), PHX_ERR_INVALID_ARGUMENT);
    EXPECT(strstr(phx_last_error(), "stage 0 holds 4") != NULL);
    EXPECT_STATUS(phx_pipeline_runner_new("zbh1", N, M, 1, bad_costs, 0.0, 0, &runner), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_pipeline_runner_new(NULL, N, M, 1, NULL, 0.0, 0, &runner), PHX_ERR_NULL);
    EXPECT_STATUS(phx_pipeline_runner_new("1f1b", N, M, 1, NULL, 0.0, 0, NULL), PHX_ERR_NULL);
    EXPECT(runner == NULL);
    CHECK(phx_pipeline_runner_new("1f1b", N, M, 1, NULL, 0.0, s->rank, &runner));
    {
        size_t twice[N] = {0, 1, 1, 2};
        EXPECT_STATUS(phx_pipeline_runner_set_ranks(runner, twice, N), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(strstr(phx_last_error(), "distinct ranks") != NULL);
        EXPECT_STATUS(phx_pipeline_runner_set_ranks(runner, twice, 2), PHX_ERR_INVALID_ARGUMENT);
        EXPECT_STATUS(phx_pipeline_runner_set_ranks(runner, NULL, 0), PHX_ERR_NULL);
    }
    CHECK(phx_pipeline_runner_timeline(runner, NULL, 0, &count));
    EXPECT(count == 0);
    cb.forward = NULL;
    EXPECT_STATUS(phx_pipeline_run(comm, runner, &cb, NULL), PHX_ERR_NULL);
    EXPECT(strstr(phx_last_error(), "forward") != NULL);
    cb = callbacks(s, 0);
    cb.dtype = 42;
    EXPECT_STATUS(phx_pipeline_run(comm, runner, &cb, NULL), PHX_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(phx_pipeline_run(comm, NULL, &cb, NULL), PHX_ERR_NULL);
    CHECK(phx_pipeline_runner_free(runner));
    CHECK(phx_pipeline_runner_free(NULL));
}

/* Stage 1's forward of micro-batch 2 fails; every stage's run returns an error. */
static void failing_iteration(phx_comm *comm, stage_state *s) {
    phx_pipeline_runner *runner = NULL;
    phx_pipeline_stage cb = callbacks(s, 0);
    phx_pipeline_outcome outcome;
    int status;
    s->fail_mb = s->rank == 1 ? 2 : -1;
    s->probe = 1;
    CHECK(phx_pipeline_runner_new("1f1b", N, M, 1, NULL, 0.0, s->rank, &runner));
    status = phx_pipeline_run(comm, runner, &cb, &outcome);
    if (s->rank == 1) {
        if (status != PHX_ERR_STAGE) fail_at(__LINE__, "the failing stage's run", status);
        EXPECT(outcome.callback_status == 7);
        EXPECT(outcome.failed_pass == PHX_PASS_F && outcome.failed_mb == 2 && outcome.failed_chunk == 0);
        EXPECT(outcome.failed_index == outcome.passes && outcome.passes == 2); /* F0 F1 ran */
        EXPECT(strstr(phx_last_error(), "stage 1") != NULL);
        EXPECT(strstr(phx_last_error(), "forward callback returned 7") != NULL);
    } else {
        if (status != PHX_ERR_PEER_LOST && status != PHX_ERR_ABORTED) fail_at(__LINE__, "a waiting stage's run", status);
        EXPECT(outcome.callback_status == 0);
        EXPECT(strstr(phx_last_error(), "stage ") != NULL);
    }
    CHECK(phx_pipeline_runner_free(runner));
}

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    stage_state *s = (stage_state *)calloc(1, sizeof(stage_state));
    (void)arg;
    EXPECT(s != NULL);
    s->fail_mb = -1;
    s->rank = comm_rank(comm);
    if (s->rank == 0) argument_errors(comm, s);
    train(comm, s, "1f1b", 1, 2, 1);
    train(comm, s, "interleaved", 2, 2, 0); /* BW passes without a fused callback */
    train(comm, s, "zbh1", 1, 3, 0);
    train(comm, s, "zbv", 2, 3, 0);
    two_pipelines(comm, s);
    failing_iteration(comm, s);
    printf("pipeline ok rank=%zu\n", s->rank);
    CHECK(phx_comm_leave(comm));
    free(s);
    return 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    run_peer_threads(SECRET, ADDR, N, peer);
    printf("all ok\n");
    return 0;
}

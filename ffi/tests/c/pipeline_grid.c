/*
 * A grid of pipelines from C: one process runs a master and four peers on threads over
 * QUIC on 127.0.0.1, placed as a 2 × 2 grid (2 stages × 2 replicas, phx_grid_in_order:
 * rank r holds stage r % 2 of replica r / 2).
 *
 * The model: two stages, each an affine map y = a_s x + b_s on vectors of K doubles
 * (a_s = 1 + s, b_s = s at first); replica r trains micro-batches r·M .. r·M + M - 1,
 * micro-batch g entering as x[i] = g + 1 + i; the loss is the sum of the last output.
 * Every value is an integer far below 2^53 (and the learning rate a power of two), so
 * the sums are exact in any order and the expectation is a serial loop here.
 *
 * Iteration 0: 1F1B on each replica's pipeline, the stage's gradients (da, db)
 * all-reduced among its replicas (phx_grid_all_reduce_gradients) equal the serial
 * gradients of both replicas' micro-batches; phx_committer_step commits the step
 * (PHX_VERDICT_KEEP) with the whole pipeline's gradient stats, and the weights are
 * a - lr·da exactly. Iteration 1: rank 3 (stage 1 of replica 1) has a NaN gradient:
 * the all-reduce carries it to the other replica, every rank's verdict is
 * PHX_VERDICT_SKIP and its step is undone (the weights are iteration 0's). Then
 * phx_grid_finish. Prints "grid ok rank=R" per peer and "all ok".
 */
#include "peer_common.h"

#include <math.h>

enum { PP = 2, DP = 2, N = PP * DP, M = 4, K = 3 };
static const double LR = 1.0 / 1024;

static const char *SECRET = "phalanx-ffi-pipeline-grid-secret-012345";
static char ADDR[PHX_ADDR_BUF_LEN];

typedef struct {
    size_t stage, replica;
    double a, b;             /* the weights */
    double saved_a, saved_b; /* what undo restores */
    double x[M][K], dy[M][K];
    double grad[2]; /* da, db */
    int steps, undos;
} rank_state;

static size_t len_k(void *user, const phx_pipeline_step *step) {
    (void)user;
    (void)step;
    return K;
}

static int forward(void *user, const phx_pipeline_step *step, const void *input, size_t input_len, void *output,
                   size_t output_len) {
    rank_state *s = (rank_state *)user;
    size_t i;
    (void)input_len;
    (void)output_len;
    for (i = 0; i < K; i++) {
        s->x[step->mb][i] =
            step->is_first ? (double)(s->replica * M + step->mb + 1 + i) : ((const double *)input)[i];
        if (!step->is_last) ((double *)output)[i] = s->a * s->x[step->mb][i] + s->b;
    }
    return 0;
}

static int backward_input(void *user, const phx_pipeline_step *step, const void *grad_out, size_t grad_out_len,
                          void *grad_in, size_t grad_in_len) {
    rank_state *s = (rank_state *)user;
    size_t i;
    (void)grad_out_len;
    (void)grad_in_len;
    for (i = 0; i < K; i++) {
        s->dy[step->mb][i] = step->is_last ? 1.0 : ((const double *)grad_out)[i];
        if (!step->is_first) ((double *)grad_in)[i] = s->a * s->dy[step->mb][i];
    }
    return 0;
}

static int backward_weight(void *user, const phx_pipeline_step *step) {
    rank_state *s = (rank_state *)user;
    size_t i;
    for (i = 0; i < K; i++) {
        s->grad[0] += s->dy[step->mb][i] * s->x[step->mb][i];
        s->grad[1] += s->dy[step->mb][i];
    }
    return 0;
}

static int opt_step(void *user, float scale) {
    rank_state *s = (rank_state *)user;
    s->saved_a = s->a;
    s->saved_b = s->b;
    s->a -= LR * scale * s->grad[0];
    s->b -= LR * scale * s->grad[1];
    s->steps++;
    return 0;
}

static int opt_undo(void *user) {
    rank_state *s = (rank_state *)user;
    s->a = s->saved_a;
    s->b = s->saved_b;
    s->undos++;
    return 0;
}

/* The serial gradients of stage `stage` over both replicas' micro-batches at the first
 * weights. */
static void expected(size_t stage, double grad[2]) {
    double a0 = 1, b0 = 0, a1 = 2;
    size_t g, i;
    grad[0] = grad[1] = 0;
    for (g = 0; g < DP * M; g++)
        for (i = 0; i < K; i++) {
            double x = (double)(g + 1 + i), y0 = a0 * x + b0;
            if (stage == 1) {
                grad[0] += 1.0 * y0;
                grad[1] += 1.0;
            } else {
                grad[0] += a1 * x;
                grad[1] += a1;
            }
        }
}

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, N);
    phx_grid_map *map = NULL;
    phx_pipeline_runner *runner = NULL;
    phx_committer *committer = NULL;
    phx_grid_position me;
    phx_pipeline_outcome run;
    phx_commit_outcome outcome;
    rank_state s;
    double want[2], other[2], a_first, b_first;
    size_t rank = comm_rank(comm);
    int it;
    (void)arg;
    memset(&s, 0, sizeof s);
    CHECK(phx_grid_in_order(PP, DP, rank, &map));
    CHECK(phx_grid_me(map, &me));
    EXPECT(me.stage == rank % PP && me.replica == rank / PP);
    s.stage = me.stage;
    s.replica = me.replica;
    s.a = (double)(1 + s.stage);
    s.b = (double)s.stage;
    a_first = s.a;
    b_first = s.b;
    CHECK(phx_grid_runner(map, "1f1b", M, 1, NULL, 0.0, &runner));
    CHECK(phx_committer_new(map, runner, 0.0, &committer)); /* no clipping */
    {
        phx_pipeline_stage stage = {PHX_DTYPE_F64, &s, len_k, len_k, forward, backward_input, backward_weight, NULL};
        phx_optimizer opt = {&s, opt_step, opt_undo};
        for (it = 0; it < 2; it++) {
            phx_grad_stats stats = {0.0, 0};
            s.grad[0] = s.grad[1] = 0;
            CHECK(phx_pipeline_run(comm, runner, &stage, &run));
            EXPECT(run.passes == 2 * M);
            if (it == 1 && rank == 3) s.grad[0] = NAN;
            CHECK(phx_grid_all_reduce_gradients(comm, map, s.grad, 2, PHX_DTYPE_F64, PHX_OP_SUM));
            CHECK(phx_grad_stats_add(&stats, s.grad, 2, PHX_DTYPE_F64));
            CHECK(phx_committer_step(comm, committer, &stats, &opt, &outcome));
            if (it == 0) {
                expected(s.stage, want);
                EXPECT(s.grad[0] == want[0] && s.grad[1] == want[1]);
                expected(1 - s.stage, other);
                EXPECT(outcome.verdict == PHX_VERDICT_KEEP && outcome.stats.non_finite == 0);
                EXPECT(outcome.stats.sum_squares ==
                       want[0] * want[0] + want[1] * want[1] + other[0] * other[0] + other[1] * other[1]);
                EXPECT(s.a == a_first - LR * 1.0f * want[0] && s.b == b_first - LR * 1.0f * want[1]);
                a_first = s.a;
                b_first = s.b;
            } else {
                /* The NaN reached both replicas of stage 1 and, along the chain, stage 0. */
                EXPECT(s.stage == 0 || isnan(s.grad[0]));
                EXPECT(outcome.verdict == PHX_VERDICT_SKIP && outcome.stats.non_finite == 1);
                EXPECT(s.a == a_first && s.b == b_first);
            }
        }
    }
    EXPECT(s.steps == 2 && s.undos == 1);
    {
        /* Argument errors fail before anything is sent. */
        phx_optimizer broken = {&s, NULL, opt_undo};
        phx_grad_stats stats = {0.0, 0};
        phx_grid_map *bad = NULL;
        EXPECT_STATUS(phx_committer_step(comm, committer, &stats, &broken, NULL), PHX_ERR_NULL);
        EXPECT_STATUS(phx_grid_in_order(PP, DP, N, &bad), PHX_ERR_INVALID_ARGUMENT);
        EXPECT_STATUS(phx_grad_stats_add(&stats, s.grad, 2, PHX_DTYPE_I32), PHX_ERR_INVALID_ARGUMENT);
        EXPECT(bad == NULL);
    }
    CHECK(phx_grid_finish(comm, map));
    printf("grid ok rank=%zu stage=%zu replica=%zu\n", rank, s.stage, s.replica);
    CHECK(phx_committer_free(committer));
    CHECK(phx_pipeline_runner_free(runner));
    CHECK(phx_grid_map_free(map));
    CHECK(phx_comm_leave(comm));
    return 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    run_peer_threads(SECRET, ADDR, N, peer);
    printf("all ok\n");
    return 0;
}

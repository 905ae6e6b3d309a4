/* The Open MPI anchor of `phalanx bench --compare mpi`: the same collectives, sizes,
 * element type (f32, sum) and iteration counts as phalanx's bench, timed the same way.
 *
 * Usage (under mpirun):
 *   mpi_bench --sizes 4096,1048576 --iters 5 --warmup 1 \
 *             --collectives all-reduce,reduce-scatter,all-gather,broadcast,all-to-all,all-scan
 *
 * Per collective and size: one checked call (inputs that make every element's expected
 * value known exactly), `warmup` untimed calls, a barrier, then the timed calls; each
 * call is timed on every rank, the slowest rank's time of each iteration is taken
 * (MPI_Reduce with MPI_MAX) and rank 0 prints the median of those as one JSON line:
 *   {"collective":"all-reduce","n":2,"size":1048576,"bytes":1048576,"count":262144,
 *    "iters":80,"median_us":...,"mean_us":...,"checked":true}
 * `size` is the size asked for, `bytes` the size measured: as in nccl-tests the larger
 * of the input and output buffers, rounded down to a multiple of n elements for the
 * collectives that split the buffer into n parts (reduce-scatter, all-gather,
 * all-to-all). Build: mpicc -O2 -o mpi_bench mpi_bench.c
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1L << 20)

static int rank, nranks;

/* Timed iterations for `bytes`: `iters` from 64 MiB up, up to 16 times more below
 * (the rule of phalanx's bench, `iters_for`). */
static long iters_for(long iters, long bytes) {
    long k = 64 * MIB / bytes;
    if (k < 1) k = 1;
    if (k > 16) k = 16;
    return iters * k;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The value of element i of rank r's input in the checked call: small integers, so
 * sums over up to a few hundred ranks are exact in f32. */
static float val(int r, long i) { return (float)(r + 1 + (int)(i % 13)); }

/* Runs collective `c` once on the given buffers. */
static void call(const char *c, float *in, float *out, long count, long part) {
    if (!strcmp(c, "all-reduce"))
        MPI_Allreduce(MPI_IN_PLACE, in, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    else if (!strcmp(c, "reduce-scatter"))
        MPI_Reduce_scatter_block(in, out, (int)part, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    else if (!strcmp(c, "all-gather"))
        MPI_Allgather(in, (int)part, MPI_FLOAT, out, (int)part, MPI_FLOAT, MPI_COMM_WORLD);
    else if (!strcmp(c, "broadcast"))
        MPI_Bcast(in, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD);
    else if (!strcmp(c, "all-to-all"))
        MPI_Alltoall(in, (int)part, MPI_FLOAT, out, (int)part, MPI_FLOAT, MPI_COMM_WORLD);
    else if (!strcmp(c, "all-scan"))
        MPI_Scan(MPI_IN_PLACE, in, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

/* Fills the inputs of the checked call. */
static void fill(const char *c, float *in, long count, long part) {
    for (long i = 0; i < count; i++) in[i] = val(rank, i);
    if (!strcmp(c, "broadcast") && rank != 0)
        for (long i = 0; i < count; i++) in[i] = 0.0f;
    if (!strcmp(c, "all-gather"))
        for (long i = 0; i < part; i++) in[i] = (float)(rank * 1000 + (int)(i % 1000));
    if (!strcmp(c, "all-to-all"))
        for (long j = 0; j < nranks; j++)
            for (long k = 0; k < part; k++) in[j * part + k] = (float)(rank * 64 + j + 4096 * (int)(k % 7));
}

/* Whether the checked call's result is the exact expected one on this rank. */
static int check(const char *c, const float *in, const float *out, long count, long part) {
    long n = nranks, tri = n * (n + 1) / 2;
    if (!strcmp(c, "all-reduce")) {
        for (long i = 0; i < count; i++)
            if (in[i] != (float)(tri + n * (i % 13))) return 0;
    } else if (!strcmp(c, "reduce-scatter")) {
        for (long k = 0; k < part; k++)
            if (out[k] != (float)(tri + n * ((rank * part + k) % 13))) return 0;
    } else if (!strcmp(c, "all-gather")) {
        for (long r = 0; r < n; r++)
            for (long k = 0; k < part; k++)
                if (out[r * part + k] != (float)(r * 1000 + k % 1000)) return 0;
    } else if (!strcmp(c, "broadcast")) {
        for (long i = 0; i < count; i++)
            if (in[i] != val(0, i)) return 0;
    } else if (!strcmp(c, "all-to-all")) {
        for (long r = 0; r < n; r++)
            for (long k = 0; k < part; k++)
                if (out[r * part + k] != (float)(r * 64 + rank + 4096 * (k % 7))) return 0;
    } else if (!strcmp(c, "all-scan")) {
        long upto = (long)(rank + 1) * (rank + 2) / 2;
        for (long i = 0; i < count; i++)
            if (in[i] != (float)(upto + (rank + 1) * (i % 13))) return 0;
    }
    return 1;
}

static void bench(const char *c, long size, long iters, long warmup) {
    long elems = size / 4, part = elems / nranks, count = elems;
    int split = !strcmp(c, "reduce-scatter") || !strcmp(c, "all-gather") || !strcmp(c, "all-to-all");
    if (split) count = part * nranks;
    if (count == 0 || part == 0) return;
    /* all-gather's input is one part, its output n parts; the others' larger buffer is `in`. */
    float *in = malloc(sizeof(float) * count), *out = malloc(sizeof(float) * count);
    if (!in || !out) MPI_Abort(MPI_COMM_WORLD, 2);
    fill(c, in, count, part);
    call(c, in, out, count, part);
    int ok = check(c, in, out, count, part), all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    memset(in, 0, sizeof(float) * count);
    for (long i = 0; i < warmup; i++) call(c, in, out, count, part);
    long n = iters_for(iters, count * 4);
    double *t = malloc(sizeof(double) * n), *slowest = malloc(sizeof(double) * n);
    if (!t || !slowest) MPI_Abort(MPI_COMM_WORLD, 2);
    MPI_Barrier(MPI_COMM_WORLD);
    for (long i = 0; i < n; i++) {
        double t0 = MPI_Wtime();
        call(c, in, out, count, part);
        t[i] = MPI_Wtime() - t0;
    }
    MPI_Reduce(t, slowest, (int)n, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        double mean = 0;
        for (long i = 0; i < n; i++) mean += slowest[i] / n;
        qsort(slowest, n, sizeof(double), cmp_double);
        double median = n % 2 ? slowest[n / 2] : (slowest[n / 2 - 1] + slowest[n / 2]) / 2;
        printf("{\"collective\":\"%s\",\"n\":%d,\"size\":%ld,\"bytes\":%ld,\"count\":%ld,\"iters\":%ld,"
               "\"median_us\":%.3f,\"mean_us\":%.3f,\"checked\":%s}\n",
               c, nranks, size, count * 4, count, n, median * 1e6, mean * 1e6, all_ok ? "true" : "false");
        fflush(stdout);
    }
    free(in), free(out), free(t), free(slowest);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    char sizes[4096] = "1048576", colls[4096] = "all-reduce";
    long iters = 5, warmup = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--sizes")) snprintf(sizes, sizeof sizes, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--collectives")) snprintf(colls, sizeof colls, "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atol(argv[i + 1]);
        else {
            if (rank == 0) fprintf(stderr, "mpi_bench: unknown option %s\n", argv[i]);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    if (iters < 1) iters = 1;
    for (char *cs = colls, *c; (c = strtok_r(cs, ",", &cs));) {
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", sizes);
        for (char *ss = copy, *s; (s = strtok_r(ss, ",", &ss));) bench(c, atol(s), iters, warmup);
    }
    MPI_Finalize();
    return 0;
}

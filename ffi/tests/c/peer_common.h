/*
 * Helpers shared by the C test programs in this folder (and the README examples the
 * Rust harnesses wrap): failure reporting, the CHECK/EXPECT macros, connecting and
 * forming a group, the master role, and peers on threads beside an in-process master.
 *
 * Include it first, before any system header (it selects POSIX.1-2008 for nanosleep).
 * Everything here is `static inline`, so a program that leaves a helper unused still
 * compiles with -Wall -Wextra -Werror -pedantic.
 */
#ifndef PHALANX_TESTS_PEER_COMMON_H
#define PHALANX_TESTS_PEER_COMMON_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "phalanx.h"

/* Prints "FAIL line L: CALL -> STATUS: last error" and exits 1. */
static inline void fail_at(int line, const char *what, int status) {
    printf("FAIL line %d: %s -> %s: %s\n", line, what, phx_status_name(status), phx_last_error());
    exit(1);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        int status_ = (call);                                                                      \
        if (status_ != PHX_OK) fail_at(__LINE__, #call, status_);                                  \
    } while (0)

#define EXPECT(cond)                                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("FAIL line %d: expected %s\n", __LINE__, #cond);                                \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* A call that must fail with `want` and leave a message. */
#define EXPECT_STATUS(call, want)                                                                  \
    do {                                                                                           \
        int status_ = (call);                                                                      \
        if (status_ != (want)) fail_at(__LINE__, #call, status_);                                  \
        EXPECT(strlen(phx_last_error()) > 0);                                                      \
    } while (0)

static inline void sleep_ms(long ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

static inline size_t comm_size(const phx_comm *comm) {
    size_t size = 0;
    CHECK(phx_comm_size(comm, &size));
    return size;
}

static inline size_t comm_rank(const phx_comm *comm) {
    size_t rank = 0;
    CHECK(phx_comm_rank(comm, &rank));
    return rank;
}

/* Connects with `secret`, a 60 s join timeout and `retry_attempts` (0, the default: no
 * retry inside a collective). */
static inline phx_comm *connect_to(const char *addr, const char *secret, int retry_attempts) {
    phx_comm *comm = NULL;
    phx_connect_options options;
    CHECK(phx_connect_options_init(&options));
    options.secret = secret;
    options.retry_attempts = (uint32_t)retry_attempts;
    options.join_timeout_ms = 60000;
    CHECK(phx_comm_connect_with(addr, &options, &comm));
    EXPECT(comm != NULL);
    return comm;
}

/* Admits joiners until the group has n members, then synchronises everyone with a
 * barrier (which also ends the last joiner's "fresh" state, so that every member's next
 * update_topology is one round). */
static inline void form_group(phx_comm *comm, size_t n) {
    while (comm_size(comm) < n) {
        size_t pending = 0;
        CHECK(phx_comm_peers_pending(comm, &pending));
        if (pending == 0) {
            sleep_ms(10);
            continue;
        }
        CHECK(phx_comm_update_topology(comm));
    }
    CHECK(phx_comm_barrier(comm));
}

/* connect_to (no retry) and form_group of n. */
static inline phx_comm *join_group(const char *addr, const char *secret, size_t n) {
    phx_comm *comm = connect_to(addr, secret, 0);
    form_group(comm, n);
    return comm;
}

/* Starts a master on 127.0.0.1 (any port). */
static inline phx_master *master_start(const char *secret) {
    phx_master *master = NULL;
    CHECK(phx_master_start("127.0.0.1:0", secret, 1000, &master));
    return master;
}

/* The master role: prints "addr HOST:PORT", serves until stdin closes, frees it. */
static inline int master_serve(phx_master *master) {
    char addr[PHX_ADDR_BUF_LEN];
    CHECK(phx_master_addr(master, addr, sizeof addr));
    printf("addr %s\n", addr);
    while (getchar() != EOF) {
    }
    CHECK(phx_master_free(master));
    return 0;
}

/* argv[1] is `role` and there are `argc_want` arguments in all. */
static inline int is_role(int argc, char **argv, const char *role, int argc_want) {
    return argc == argc_want && strcmp(argv[1], role) == 0;
}

/* One process, a whole group: starts a master on 127.0.0.1, writes its address to `addr`
 * (PHX_ADDR_BUF_LEN bytes, where `peer` reads it), starts `n` threads of `peer` 50 ms
 * apart (they join one at a time: ranks follow thread order loosely), waits for them all
 * and frees the master. */
static inline void run_peer_threads(const char *secret, char *addr, int n, void *(*peer)(void *)) {
    enum { MAX_THREADS = 16 };
    pthread_t threads[MAX_THREADS];
    phx_master *master = master_start(secret);
    int i;
    EXPECT(n > 0 && n <= MAX_THREADS);
    CHECK(phx_master_addr(master, addr, PHX_ADDR_BUF_LEN));
    for (i = 0; i < n; i++) {
        EXPECT(pthread_create(&threads[i], NULL, peer, NULL) == 0);
        sleep_ms(50);
    }
    for (i = 0; i < n; i++) EXPECT(pthread_join(threads[i], NULL) == 0);
    CHECK(phx_master_free(master));
}

#endif

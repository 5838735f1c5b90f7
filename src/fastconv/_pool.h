/* fastconv: a small caller-runs thread pool for latency-bound calls (batch 1).
 *
 * Why not OpenMP there: a parallel region (and every barrier in it) makes the calling thread
 * wait for a worker that may be asleep, and waking a sleeping thread costs 55-75 us on the
 * virtual machines the library was measured on, against a 0.4-0.6 ms call: a batch-1 3x3
 * convolution ran slower on 2 threads than on 1.  Here the caller never waits for a worker
 * that has not started: it publishes a job of n independent items, wakes the workers and
 * takes items itself from the same atomic counter; a worker that wakes late finds fewer items
 * left, or none.  At the end the caller waits only for the items that workers have claimed
 * (and are running).  A job is therefore never slower than running it on the caller alone,
 * plus one futex wake-up call (a few us) when a worker sleeps.
 *
 * fc_pool_run(nthreads, fn, ctx, n) runs fn(ctx, i, tid) for i in [0, n): tid is 0 on the
 * caller and 1..nthreads-1 on workers, so that fn can index per-thread scratch.  Items must
 * be independent; consecutive fc_pool_run calls are ordered (the second starts after every
 * item of the first has finished), which is what a phase barrier needs.
 *
 * Workers are created on first use, spin for a short while (fc_pool_spin_ns) after each job
 * so that the next phase of the same call finds them awake, then sleep on a condition
 * variable.  Within a burst of calls (fc_pool_burst: nn's modules mark their forward, so a
 * model's layers form one burst) they spin up to fc_pool_burst_ns instead, and sleep as soon
 * as the burst ends: a sleeping worker woke 15-25 us after the next layer's job was
 * published, and the caller spent about as long in the wake-up call, so that a LeNet-sized
 * model at batch 1 ran its small layers slower on 2 threads than on 1.  One caller at a time: a call that finds the pool busy (another Python thread
 * in a nogil kernel) runs its items on its own thread.  After fork() the child starts with
 * no workers (pthread_atfork).  Without POSIX threads or C11 atomics (Windows; or
 * FC_POOL_NO_PTHREADS, to test that build) a job is an OpenMP loop, and in a serial build
 * (FASTCONV_OPENMP 0) it runs on the caller.
 */
#ifndef FASTCONV_POOL_H
#define FASTCONV_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef void (*fc_pool_fn)(void *ctx, ptrdiff_t i, int tid);

#if defined(FASTCONV_OPENMP) && FASTCONV_OPENMP && !defined(_WIN32) && \
    !defined(FC_POOL_NO_PTHREADS) && \
    defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
#define FC_POOL_THREADS 1
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FC_POOL_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define FC_POOL_PAUSE() __asm__ __volatile__("yield")
#else
#define FC_POOL_PAUSE() ((void)0)
#endif

#define FC_POOL_MAX 64

typedef struct {
    _Atomic(fc_pool_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int64_t n;
    _Atomic int nthreads;
    _Atomic int64_t done;
} fc_pool_job;

static struct {
    /* high 32 bits: the job's generation, low 32 bits: the next item to claim */
    _Atomic uint64_t claim;
    /* two job slots, by generation parity: a worker that read generation g reads slot g & 1,
       which the caller rewrites only for generation g + 2, after g + 1 was published, so a
       worker holding stale fields can never claim an item (its compare-exchange expects g) */
    fc_pool_job job[2];
    _Atomic int sleeping;
    _Atomic int nworkers;
    _Atomic int busy;
    _Atomic long spin_ns;
    _Atomic long burst_ns;
    _Atomic int burst;          /* > 0: inside a burst of calls (fc_pool_burst) */
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int atfork_done;
} fc_pool = {0, {{0}}, 0, 0, 0, 20000, 1000000, 0, PTHREAD_MUTEX_INITIALIZER,
             PTHREAD_COND_INITIALIZER, 0};

static inline long fc_pool_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* claim and run items of generation gen until none is left; returns how many it ran */
static inline int64_t fc_pool_drain(uint32_t gen, int tid)
{
    fc_pool_job *job = &fc_pool.job[gen & 1];
    fc_pool_fn fn = atomic_load_explicit(&job->fn, memory_order_relaxed);
    void *ctx = atomic_load_explicit(&job->ctx, memory_order_relaxed);
    int64_t n = atomic_load_explicit(&job->n, memory_order_relaxed);
    int64_t ran = 0;
    if (tid >= atomic_load_explicit(&job->nthreads, memory_order_relaxed))
        return 0;
    uint64_t c = atomic_load_explicit(&fc_pool.claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(c >> 32) != gen || (int64_t)(uint32_t)c >= n)
            break;
        if (atomic_compare_exchange_weak_explicit(&fc_pool.claim, &c, c + 1,
                                                  memory_order_acq_rel, memory_order_acquire)) {
            fn(ctx, (ptrdiff_t)(uint32_t)c, tid);
            ran++;
            c = atomic_load_explicit(&fc_pool.claim, memory_order_acquire);
        }
    }
    return ran;
}

static void *fc_pool_worker(void *arg)
{
    int tid = (int)(intptr_t)arg;
    /* not the current generation: a job published before this thread ran is still drained
       (draining a finished or stale generation claims nothing) */
    uint32_t seen = (uint32_t)(atomic_load(&fc_pool.claim) >> 32) - 1;
    for (;;) {
        uint64_t c = atomic_load_explicit(&fc_pool.claim, memory_order_acquire);
        uint32_t gen = (uint32_t)(c >> 32);
        if (gen != seen) {
            seen = gen;
            int64_t ran = fc_pool_drain(gen, tid);
            if (ran)
                atomic_fetch_add_explicit(&fc_pool.job[gen & 1].done, ran, memory_order_release);
            continue;
        }
        /* spin for a while (longer inside a burst), then sleep until the generation
           changes */
        long t0 = fc_pool_now_ns();
        long budget = atomic_load_explicit(&fc_pool.spin_ns, memory_order_relaxed);
        long burst_budget = atomic_load_explicit(&fc_pool.burst_ns, memory_order_relaxed);
        int woke = 0;
        while (!woke) {
            for (int k = 0; k < 64; k++) {
                FC_POOL_PAUSE();
                if ((uint32_t)(atomic_load_explicit(&fc_pool.claim, memory_order_acquire) >> 32)
                        != seen) {
                    woke = 1;
                    break;
                }
            }
            if (!woke) {
                long spent = fc_pool_now_ns() - t0;
                if (spent >= budget && (spent >= burst_budget ||
                        atomic_load_explicit(&fc_pool.burst, memory_order_relaxed) <= 0))
                    break;
            }
        }
        if (woke)
            continue;
        pthread_mutex_lock(&fc_pool.mutex);
        atomic_fetch_add(&fc_pool.sleeping, 1);
        while ((uint32_t)(atomic_load(&fc_pool.claim) >> 32) == seen)
            pthread_cond_wait(&fc_pool.cond, &fc_pool.mutex);
        atomic_fetch_sub(&fc_pool.sleeping, 1);
        pthread_mutex_unlock(&fc_pool.mutex);
    }
    return NULL;
}

static void fc_pool_atfork_child(void)
{
    /* the workers did not survive the fork; the job counters and locks restart clean */
    atomic_store(&fc_pool.nworkers, 0);
    atomic_store(&fc_pool.sleeping, 0);
    atomic_store(&fc_pool.busy, 0);
    atomic_store(&fc_pool.burst, 0);    /* a burst open in another thread did not come along */
    pthread_mutex_init(&fc_pool.mutex, NULL);
    pthread_cond_init(&fc_pool.cond, NULL);
}

/* make sure nthreads - 1 workers exist (called by the pool's current owner only) */
static int fc_pool_grow(int nthreads)
{
    int have = atomic_load(&fc_pool.nworkers);
    if (!fc_pool.atfork_done) {
        if (pthread_atfork(NULL, NULL, fc_pool_atfork_child) == 0)
            fc_pool.atfork_done = 1;
        else
            return 0;
    }
    while (have < nthreads - 1 && have < FC_POOL_MAX - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&t, &attr, fc_pool_worker, (void *)(intptr_t)(have + 1));
        pthread_attr_destroy(&attr);
        if (err)
            break;
        have++;
        atomic_store(&fc_pool.nworkers, have);
    }
    return have;
}

static void fc_pool_run(int nthreads, fc_pool_fn fn, void *ctx, ptrdiff_t n)
{
    if (n <= 0)
        return;
    int expect = 0;
    if (nthreads <= 1 || n == 1 || n >= (ptrdiff_t)1 << 31 ||
            !atomic_compare_exchange_strong(&fc_pool.busy, &expect, 1)) {
        for (ptrdiff_t i = 0; i < n; i++)
            fn(ctx, i, 0);
        return;
    }
    int workers = fc_pool_grow(nthreads);
    if (workers < 1) {
        atomic_store(&fc_pool.busy, 0);
        for (ptrdiff_t i = 0; i < n; i++)
            fn(ctx, i, 0);
        return;
    }
    if (nthreads > workers + 1)
        nthreads = workers + 1;
    uint32_t gen = (uint32_t)(atomic_load(&fc_pool.claim) >> 32) + 1;
    fc_pool_job *job = &fc_pool.job[gen & 1];
    atomic_store_explicit(&job->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&job->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&job->n, (int64_t)n, memory_order_relaxed);
    atomic_store_explicit(&job->nthreads, nthreads, memory_order_relaxed);
    atomic_store_explicit(&job->done, 0, memory_order_relaxed);
    atomic_store(&fc_pool.claim, (uint64_t)gen << 32);          /* publish (seq_cst) */
    if (atomic_load(&fc_pool.sleeping) > 0) {
        pthread_mutex_lock(&fc_pool.mutex);
        pthread_cond_broadcast(&fc_pool.cond);
        pthread_mutex_unlock(&fc_pool.mutex);
    }
    int64_t ran = fc_pool_drain(gen, 0);
    /* wait for the items the workers claimed: they are running, not asleep */
    while (ran + atomic_load_explicit(&job->done, memory_order_acquire) < (int64_t)n)
        FC_POOL_PAUSE();
    atomic_store(&fc_pool.busy, 0);
}

/* wake every sleeping worker with an empty job (a new generation with no items), so that
   they spin (inside a burst) by the time the next job comes; nothing for nthreads <= 1, when
   none sleeps or when the pool is busy.  Returns 1 when it woke them. */
static int fc_pool_wake(int nthreads)
{
    int expect = 0;
    if (nthreads <= 1 || atomic_load(&fc_pool.sleeping) <= 0 ||
            !atomic_compare_exchange_strong(&fc_pool.busy, &expect, 1))
        return 0;
    uint32_t gen = (uint32_t)(atomic_load(&fc_pool.claim) >> 32) + 1;
    fc_pool_job *job = &fc_pool.job[gen & 1];
    atomic_store_explicit(&job->n, 0, memory_order_relaxed);
    atomic_store_explicit(&job->nthreads, 0, memory_order_relaxed);
    atomic_store_explicit(&job->done, 0, memory_order_relaxed);
    atomic_store(&fc_pool.claim, (uint64_t)gen << 32);
    pthread_mutex_lock(&fc_pool.mutex);
    pthread_cond_broadcast(&fc_pool.cond);
    pthread_mutex_unlock(&fc_pool.mutex);
    atomic_store(&fc_pool.busy, 0);
    return 1;
}

static void fc_pool_set_spin_ns(long ns) { atomic_store(&fc_pool.spin_ns, ns < 0 ? 0 : ns); }
static void fc_pool_set_burst_ns(long ns) { atomic_store(&fc_pool.burst_ns, ns < 0 ? 0 : ns); }
/* delta +1: a burst of calls begins (nested and concurrent bursts count), -1: it ends;
   returns the count of open bursts now */
static int fc_pool_burst(int delta) { return atomic_fetch_add(&fc_pool.burst, delta) + delta; }
/* workers asleep now (tests) */
static int fc_pool_sleeping(void) { return atomic_load(&fc_pool.sleeping); }

/* A fact about an item that the first of the items' claimers decides and the others wait
 * for (a few us): *f is 0 while undecided, 1 while being decided, then 2 + the answer. */
static int fc_once_begin(unsigned char *f)
{
    unsigned char expect = 0;
    return atomic_compare_exchange_strong((_Atomic unsigned char *)f, &expect, 1);
}
static void fc_once_set(unsigned char *f, int yes)
{
    atomic_store_explicit((_Atomic unsigned char *)f, (unsigned char)(2 + (yes != 0)),
                          memory_order_release);
}
static int fc_once_get(unsigned char *f)
{
    unsigned char v;
    while ((v = atomic_load_explicit((_Atomic unsigned char *)f, memory_order_acquire)) < 2)
        FC_POOL_PAUSE();
    return v - 2;
}

#else  /* no POSIX threads or C11 atomics (Windows): an OpenMP loop when built with OpenMP */

#if defined(FASTCONV_OPENMP) && FASTCONV_OPENMP && defined(_OPENMP)
#include <omp.h>
static void fc_pool_run(int nthreads, fc_pool_fn fn, void *ctx, ptrdiff_t n)
{
    if (nthreads > 1 && n > 1 && n <= 0x7fffffff) {
        int m = (int)n, i;
        #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (i = 0; i < m; i++)
            fn(ctx, i, omp_get_thread_num());
        return;
    }
    for (ptrdiff_t i = 0; i < n; i++)
        fn(ctx, i, 0);
}
static int fc_once_begin(unsigned char *f)
{
    int r = 0;
    #pragma omp critical(fc_once)
    {
        if (*f == 0) { *f = 1; r = 1; }
    }
    return r;
}
static void fc_once_set(unsigned char *f, int yes)
{
    #pragma omp critical(fc_once)
    *f = (unsigned char)(2 + (yes != 0));
}
static int fc_once_get(unsigned char *f)
{
    for (;;) {
        unsigned char v;
        #pragma omp critical(fc_once)
        v = *f;
        if (v >= 2)
            return v - 2;
    }
}
#else  /* serial build: every job on the caller */
static void fc_pool_run(int nthreads, fc_pool_fn fn, void *ctx, ptrdiff_t n)
{
    (void)nthreads;
    for (ptrdiff_t i = 0; i < n; i++)
        fn(ctx, i, 0);
}
static int fc_once_begin(unsigned char *f) { if (*f) return 0; *f = 1; return 1; }
static void fc_once_set(unsigned char *f, int yes) { *f = (unsigned char)(2 + (yes != 0)); }
static int fc_once_get(unsigned char *f) { return *f - 2; }
#endif

static void fc_pool_set_spin_ns(long ns) { (void)ns; }
static void fc_pool_set_burst_ns(long ns) { (void)ns; }
static int fc_pool_burst(int delta) { (void)delta; return 0; }
static int fc_pool_sleeping(void) { return 0; }
static int fc_pool_wake(int nthreads) { (void)nthreads; return 0; }

#endif
#endif

/* Teams of workers for the kernels' parallel regions: OpenMP where the compiler has it, else a small pthread pool.
 *
 * Every region is one call, team_run(threads, fn, ctx): each worker runs fn(ctx, tid, nth) and the workers meet at
 * team_barrier inside it (decode.c's one region per step). Work is split by share() on tid and nth alone and every
 * value is computed by the same code in the same order whoever computes it, so the results do not depend on the
 * runtime, nor on how many workers a region gets.
 *
 * Why a pthread pool at all: Apple's clang has no -fopenmp (OpenMP there needs Homebrew's libomp), and a build
 * without threads would leave a laptop's other cores idle. The pool keeps the design of one region per step:
 * workers are started once and wait between regions, spinning briefly, then yielding, then sleeping.
 */
#define _GNU_SOURCE  /* sched_yield */
#include <sched.h>
#include <stdint.h>

#include "blocks.h"

#if defined(_OPENMP)
#include <omp.h>
#else
#include <pthread.h>
#endif

#define SPINS 4096   /* pauses (~20-40 ns each) a team_barrier waits before it yields the CPU */
#define NAPS 256     /* yields an idle pool worker makes, after its spins, before it sleeps until the next region */

/* ---- a spinning barrier inside one region ---------------------------------------------------------------------
 * A decode step is ~100 short phases (products, attention, norms). As separate OpenMP regions each paid a fork and
 * a join; libgomp spins ~300k iterations on those only while it manages no more threads than CPUs, and a second
 * Python thread that ever ran OpenMP (a server's engine thread, a web UI's worker) tips it into futex sleeps: the
 * 270M decoded 65 instead of 100 tok/s from a non-main thread (2 cores). One region per step with this barrier
 * spins briefly, then yields the CPU, whatever libgomp decides. (Sleeping on a futex after the spin measured
 * worse: with grammar masks computed on another thread, a yielding waiter hands it its core at once. Sleeping
 * after 64 yields, so that Linux could move a preempted worker onto the idle core, measured worse too with a
 * server's openai clients on the same 2 cores: batch-8 steps of 43.1-44.8 against 40.4-41.9 ms.) */
void team_barrier(team_t *b, int n) {
    if (n <= 1) {
        b->next = 0;
        return;
    }
    const int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->next, 0, __ATOMIC_RELAXED);  /* every worker is here: no claim() loop is running */
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen; spins++) {
        if (spins < SPINS) cpu_relax();
        else sched_yield();  /* oversubscribed (another busy thread on our cores): let it run */
    }
}

#if defined(_OPENMP)

const char *kernels_threading(void) { return "openmp"; }

void team_run(int threads, team_fn fn, void *ctx) {
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}

/* Ends the calling thread's OpenMP pool (its docked workers exit; the next region starts a new one). libgomp
 * spins on its barriers only while it manages no more threads than CPUs, and every thread that ever ran a region
 * keeps its pool: a model loaded on the main thread and decoded on a server's engine thread put Gemma 4's per-matrix
 * regions into futex sleeps (E2B: 20 instead of 30 tok/s on 2 cores). 0 on success, -1 without it. */
#pragma weak omp_pause_resource_all  /* libgomp has it since GCC 9 (OpenMP 5.0); an older one leaves it NULL */
int release_threads(void) {
    if (omp_pause_resource_all) return omp_pause_resource_all(omp_pause_hard);
    return -1;
}

#else  /* a pthread pool: workers 1 .. started, the caller is worker 0 */

#define MAX_WORKERS 255

static struct {
    pthread_mutex_t busy;   /* held for a whole region: one team at a time */
    pthread_mutex_t lock;   /* guards the sleepers' wait on `wake` */
    pthread_cond_t wake;
    int started;            /* pool workers running */
    int gen;                /* bumped when a region is posted */
    int pending;            /* pool workers yet to finish the region (all of them, in it or not) */
    int nth;
    team_fn fn;
    void *ctx;
    int first_gen[MAX_WORKERS + 1];  /* the generation a new worker starts from */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

const char *kernels_threading(void) { return "pthreads"; }

static void *pool_worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = pool.first_gen[tid];
    for (;;) {
        int gen;
        for (long spins = 0; (gen = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE)) == seen; spins++) {
            if (spins < SPINS) {
                cpu_relax();
            } else if (spins < SPINS + NAPS) {
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                while (__atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        seen = gen;
        if (tid < pool.nth) pool.fn(pool.ctx, tid, pool.nth);
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE);  /* every worker acknowledges: the next region
                                                                     can only be posted once all have read this one */
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own pool when it first needs one. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
}

static int pool_grow(int want) {  /* workers available for a team of `want` (the caller holds pool.busy) */
    static int hooked;
    if (!hooked) hooked = 1, pthread_atfork(NULL, NULL, pool_after_fork);
    while (pool.started < want - 1 && pool.started < MAX_WORKERS) {
        const int tid = pool.started + 1;
        pthread_t t;
        pool.first_gen[tid] = pool.gen;
        if (pthread_create(&t, NULL, pool_worker, (void *)(intptr_t)tid) != 0) break;
        pthread_detach(t);
        pool.started = tid;
    }
    return pool.started + 1 < want ? pool.started + 1 : want;
}

/* A region with up to `threads` workers. A second thread calling while a region runs (a server's engine thread
 * beside a loader) runs its region alone: the same results, no waiting on the other's team. */
void team_run(int threads, team_fn fn, void *ctx) {
    if (threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(ctx, 0, 1);
        return;
    }
    const int nth = pool_grow(threads);
    pool.fn = fn, pool.ctx = ctx, pool.nth = nth;
    __atomic_store_n(&pool.pending, pool.started, __ATOMIC_RELAXED);
    pthread_mutex_lock(&pool.lock);
    __atomic_store_n(&pool.gen, pool.gen + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(ctx, 0, nth);
    for (long spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spins++) {
        if (spins < SPINS) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.busy);
}

int release_threads(void) { return -1; }  /* the pool's idle workers sleep: nothing to hand back */

#endif

/* A small persistent thread pool for `_blockcopy`: a call is split into parts, the calling
 * thread runs parts too, and pool threads take the others.
 *
 * Why persistent: creating a thread per call costs tens of microseconds, a noticeable
 * share of a 1 MiB copy; pool threads sleep on a condition variable between calls.
 * Why the caller takes parts too: several Python threads (the server's workers, several
 * engines) may copy at once and share the pool; a call whose parts no pool thread has
 * picked up yet runs them itself, so it never waits for another call's work, and a pool
 * that could not start a thread (or was lost in a fork) still finishes every call.
 *
 * Pool threads run no Python code. They block every signal but the synchronous ones
 * (SIGBUS, SIGSEGV, SIGFPE, SIGILL): Python's handlers and asynchronous signals stay with
 * Python's threads, while a SIGBUS raised by a pool thread's copy reaches it (a blocked
 * synchronous fault would kill the process) and unwinds that thread's own guard.
 */
#include <pthread.h>
#include <signal.h>

#define POOL_MAX_THREADS 64

typedef void (*PartFn)(void *arg, int part);

typedef struct Job {
    PartFn fn;
    void *arg;
    int parts, next, done; /* under pool_lock */
    struct Job *qnext;
} Job;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER; /* a job was queued */
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER; /* a job's last part ended */
static Job *queue_head;
static int pool_threads;
static sigset_t pool_mask;

/* The next part of `job`, or -1 when all are taken; a job leaves the queue with its last
 * part, so a queued job always has work. Called with pool_lock held. */
static int pool_take(Job *job)
{
    if (job->next >= job->parts)
        return -1;
    int part = job->next++;
    if (job->next == job->parts) {
        Job **at = &queue_head;
        while (*at != NULL && *at != job)
            at = &(*at)->qnext;
        if (*at == job)
            *at = job->qnext;
    }
    return part;
}

static void *pool_thread(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (queue_head == NULL)
            pthread_cond_wait(&pool_work, &pool_lock);
        Job *job = queue_head;
        int part = pool_take(job);
        pthread_mutex_unlock(&pool_lock);
        job->fn(job->arg, part);
        pthread_mutex_lock(&pool_lock);
        if (++job->done == job->parts)
            pthread_cond_broadcast(&pool_done);
    }
    return NULL;
}

/* Start pool threads until there are `want`, as far as the system lets us. pool_lock held. */
static void pool_grow(int want)
{
    sigset_t old;
    /* Set the mask before creating: a thread inherits it, so no signal can reach a pool
     * thread in the instant before it would have blocked it itself. */
    pthread_sigmask(SIG_SETMASK, &pool_mask, &old);
    while (pool_threads < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, pool_thread, NULL);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool_threads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Run fn(arg, 0..parts-1), each part once, on this thread and up to parts-1 pool threads;
 * return when every part has returned. */
static void pool_run(PartFn fn, void *arg, int parts)
{
    if (parts <= 1) {
        fn(arg, 0);
        return;
    }
    Job job = {fn, arg, parts, 1, 0, NULL}; /* part 0 is ours */
    pthread_mutex_lock(&pool_lock);
    if (pool_threads < parts - 1)
        pool_grow(parts - 1);
    Job **tail = &queue_head;
    while (*tail != NULL)
        tail = &(*tail)->qnext;
    *tail = &job;
    pthread_cond_broadcast(&pool_work);
    pthread_mutex_unlock(&pool_lock);
    int part = 0;
    pthread_mutex_lock(&pool_lock);
    do {
        pthread_mutex_unlock(&pool_lock);
        fn(arg, part);
        pthread_mutex_lock(&pool_lock);
        job.done++;
    } while ((part = pool_take(&job)) >= 0);
    while (job.done < job.parts)
        pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
}

/* fork() copies only the forking thread: the child starts with an empty pool (threads are
 * started again on demand) and a lock nobody else holds. */
static void pool_prefork(void) { pthread_mutex_lock(&pool_lock); }
static void pool_parent(void) { pthread_mutex_unlock(&pool_lock); }
static void pool_child(void)
{
    pthread_mutex_unlock(&pool_lock);
    pthread_cond_init(&pool_work, NULL);
    pthread_cond_init(&pool_done, NULL);
    queue_head = NULL;
    pool_threads = 0;
}

static int pool_init(void)
{
    sigfillset(&pool_mask);
    sigdelset(&pool_mask, SIGBUS);
    sigdelset(&pool_mask, SIGSEGV);
    sigdelset(&pool_mask, SIGFPE);
    sigdelset(&pool_mask, SIGILL);
    return pthread_atfork(pool_prefork, pool_parent, pool_child);
}

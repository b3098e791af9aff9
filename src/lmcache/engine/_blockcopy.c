/* Whole-block copies between a peer's KV memory and a chunk buffer, guarded against SIGBUS,
 * at memory speed.
 *
 * Why this is C: the server maps an engine's KV segment (a tmpfs file the engine owns).
 * If the engine truncates or shrinks that file, the next load or store through the
 * mapping past the new end raises SIGBUS, whose default action kills the whole server
 * (every engine loses its cache). Reading the file through its descriptor (preadv/pwritev)
 * cannot fault, but measured at half the speed of a mapped copy; copies in a helper
 * process cost one process hop per chunk. Here the copy runs through the mapping, and a
 * SIGBUS raised by a copying thread *while it copies* unwinds to the start of its share of
 * the copy (sigsetjmp/siglongjmp), which then reports the faulting address instead of
 * dying. A SIGBUS anywhere else is handed to whatever handled it before us (Python's
 * faulthandler, or the default action), exactly as if we were not installed.
 *
 *     copy_blocks(outer, ids, num_blocks, stride, plane_bytes, chunk, chunk_blocks,
 *                 first, to_engine, threads=1) -> 0 | faulting address
 *
 *     peer memory, one (layer, plane) row          chunk buffer [rows][chunk_blocks][pb]
 *     outer[r] -> [b0][b1][b2][b3][b4][b5] ...      row r: [  ][  ][ids[0]][ids[1]]...
 *                          stride between blocks                ^ first
 *
 * `outer` holds one absolute address per row (uint64): the caller keeps the memory they
 * point into alive and checked the layout's span (`lmcache.engine.transfer`); block ids
 * and the chunk buffer's size are checked here. The GIL is released while copying.
 *
 * Why it is fast (measured in benchmarks/copy_profile.py against np.copyto of the same
 * bytes): copies of at least `stream_min_bytes` stream their stores, 4 pages at a time
 * (_blockcopy_stream.h says why: 0.56x np.copyto with memcpy, ~1.0x streamed), and split
 * their pieces evenly by bytes over up to `threads` threads of a persistent pool
 * (_blockcopy_pool.h), since one core alone may not saturate memory bandwidth.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_blockcopy_pool.h"

#if defined(__x86_64__)
#define HAVE_STREAMING 1
#include "_blockcopy_stream.h"
#endif

/* Tunables (`_tune`, for the profile script and tests): total bytes from which a copy
 * streams its stores (below it the data stays cached for whoever reads it next), and the
 * least bytes worth a thread of their own: measured on a 2-CPU VM, a 512 KiB copy took
 * 30 us on one thread and 34 us split over two (waking a thread costs more than it
 * saves), 1 MiB took 190 us on one and 110 us on two. */
static Py_ssize_t stream_min_bytes = 1 << 20;
static Py_ssize_t part_min_bytes = 512 << 10;

/* ----- SIGBUS guard ---------------------------------------------------------------------- */

typedef struct {
    sigjmp_buf env;
    void *volatile fault_addr;
} Guard;

/* The guard of the copy this thread is running, NULL outside a copy. SIGBUS from a memory
 * access is delivered to the thread that faulted, so a thread-local guard is exact: each
 * pool thread copying a share of a call has its own. */
static __thread Guard *volatile current_guard;
static struct sigaction previous_action;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    Guard *guard = current_guard;
    if (guard != NULL) {
        current_guard = NULL;
        guard->fault_addr = info->si_addr;
        siglongjmp(guard->env, 1); /* restores the signal mask saved by sigsetjmp */
    }
    /* Not ours: run what ran before us, then die the default way (a hardware fault
     * would only repeat on return). raise() stays pending until the handler returns. */
    if (previous_action.sa_flags & SA_SIGINFO) {
        if (previous_action.sa_sigaction != NULL)
            previous_action.sa_sigaction(sig, info, context);
    } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
        previous_action.sa_handler(sig);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Install our handler unless it is the current one (someone, e.g. faulthandler.enable(),
 * may have replaced it since); what it replaces becomes the handler for foreign faults. */
static int ensure_installed(void)
{
    struct sigaction now, ours;
    if (sigaction(SIGBUS, NULL, &now) != 0)
        return -1;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus)
        return 0;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    return sigaction(SIGBUS, &ours, &previous_action);
}

/* ----- one piece ------------------------------------------------------------------------- */

static inline void copy_piece(char *d, const char *s, size_t n, int streaming)
{
#ifdef HAVE_STREAMING
    if (streaming && n >= 256) {
        stream_copy(d, s, n);
        return;
    }
#endif
    (void)streaming;
    memcpy(d, s, n);
}

/* ----- a call: pieces, split by bytes over parts ----------------------------------------- */

typedef struct {
    char *dst;
    const char *src;
    size_t len;
} Piece;

typedef struct {
    const Piece *pieces;
    Py_ssize_t npieces;
    size_t total;
    int parts, streaming;
    volatile int stop;         /* a part faulted: the others stop at their next piece */
    void *volatile fault_addr; /* the first fault's address */
} Call;

/* Copy bytes [part * total / parts, (part + 1) * total / parts) of the concatenated pieces,
 * under a guard of this thread's own. Runs on the caller's thread or a pool thread. */
static void run_part(void *arg, int part)
{
    Call *call = arg;
    size_t begin = call->total / call->parts * part + (call->total % call->parts) * part / call->parts;
    size_t end = part + 1 == call->parts ? call->total
                                         : call->total / call->parts * (part + 1) +
                                               (call->total % call->parts) * (part + 1) / call->parts;
    Guard guard;
    guard.fault_addr = NULL;
    if (sigsetjmp(guard.env, 1)) {
        current_guard = NULL;
        __atomic_store_n(&call->stop, 1, __ATOMIC_RELAXED);
        void *expected = NULL;
        void *addr = guard.fault_addr ? guard.fault_addr : (void *)1;
        __atomic_compare_exchange_n(&call->fault_addr, &expected, addr, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
        return;
    }
    current_guard = &guard;
    size_t at = 0; /* byte offset of piece i in the concatenation */
    for (Py_ssize_t i = 0; i < call->npieces && at < end; i++) {
        const Piece *p = &call->pieces[i];
        size_t lo = begin > at ? begin - at : 0;
        size_t hi = end - at < p->len ? end - at : p->len;
        if (lo < hi) {
            if (__atomic_load_n(&call->stop, __ATOMIC_RELAXED))
                break;
            copy_piece(p->dst + lo, p->src + lo, hi - lo, call->streaming);
        }
        at += p->len;
    }
    current_guard = NULL;
#ifdef HAVE_STREAMING
    if (call->streaming)
        _mm_sfence(); /* streamed stores are visible before the call reports it is done */
#endif
}

/* One piece per run of consecutive block ids when the blocks of a row are packed
 * (stride == plane_bytes, a run is one contiguous span on both sides), else per block. */
static Piece *make_pieces(const uint64_t *outer, Py_ssize_t rows, const int64_t *ids,
                          Py_ssize_t n, Py_ssize_t stride, Py_ssize_t pb, char *chunk,
                          Py_ssize_t chunk_blocks, Py_ssize_t first, int to_engine,
                          Py_ssize_t *count, size_t *total)
{
    Piece *pieces = malloc(sizeof(Piece) * (size_t)(rows * n > 0 ? rows * n : 1));
    if (pieces == NULL)
        return NULL;
    int packed = stride == pb;
    Py_ssize_t k = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        char *row = (char *)(uintptr_t)outer[r];
        char *buf = chunk + (r * chunk_blocks + first) * pb;
        for (Py_ssize_t j = 0, run; j < n; j += run) {
            run = 1;
            if (packed)
                while (j + run < n && ids[j + run] == ids[j] + run)
                    run++;
            char *peer = row + ids[j] * stride, *mine = buf + j * pb;
            pieces[k].dst = to_engine ? peer : mine;
            pieces[k].src = to_engine ? mine : peer;
            pieces[k].len = (size_t)(run * pb);
            k++;
        }
    }
    *count = k;
    *total = (size_t)(rows * n * pb);
    return pieces;
}

static PyObject *copy_blocks(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer outer, ids, chunk;
    Py_ssize_t num_blocks, stride, pb, chunk_blocks, first;
    PyObject *chunk_obj;
    int to_engine, threads = 1;
    if (!PyArg_ParseTuple(args, "y*y*nnnOnnp|i", &outer, &ids, &num_blocks, &stride, &pb,
                          &chunk_obj, &chunk_blocks, &first, &to_engine, &threads))
        return NULL;
    PyObject *result = NULL;
    int have_chunk = 0;
    const char *problem = NULL;
    if (outer.len % 8 || ids.len % 8)
        problem = "outer and ids must be arrays of 8-byte integers";
    else if (pb <= 0 || stride < pb || num_blocks <= 0 || chunk_blocks <= 0 || first < 0)
        problem = "plane_bytes, stride, num_blocks and chunk_blocks must be positive";
    else if (threads < 1 || threads > POOL_MAX_THREADS)
        problem = "threads must be between 1 and 64";
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        goto done;
    }
    Py_ssize_t rows = outer.len / 8, n = ids.len / 8;
    const int64_t *id = (const int64_t *)ids.buf;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (id[j] < 0 || id[j] >= num_blocks) {
            PyErr_Format(PyExc_ValueError, "block id %lld out of range 0..%zd",
                         (long long)id[j], num_blocks - 1);
            goto done;
        }
    }
    /* The chunk buffer is written by a gather (to_engine false), only read by a scatter. */
    if (PyObject_GetBuffer(chunk_obj, &chunk, to_engine ? PyBUF_SIMPLE : PyBUF_WRITABLE) != 0)
        goto done;
    have_chunk = 1;
    if (first + n > chunk_blocks || rows * chunk_blocks * pb > chunk.len) {
        PyErr_Format(PyExc_ValueError,
                     "chunk buffer of %zd bytes cannot hold %zd rows of %zd blocks (from %zd)",
                     chunk.len, rows, n, first);
        goto done;
    }
    if (ensure_installed() != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    Call call;
    memset(&call, 0, sizeof call);
    Piece *pieces = make_pieces((const uint64_t *)outer.buf, rows, id, n, stride, pb,
                                (char *)chunk.buf, chunk_blocks, first, to_engine,
                                &call.npieces, &call.total);
    if (pieces == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    call.pieces = pieces;
    size_t most = call.total / (size_t)part_min_bytes;
    call.parts = most < 1 ? 1 : most < (size_t)threads ? (int)most : threads;
    call.streaming = call.total >= (size_t)stream_min_bytes;
    Py_BEGIN_ALLOW_THREADS
    pool_run(run_part, &call, call.parts);
    Py_END_ALLOW_THREADS
    free(pieces);
    result = call.fault_addr ? PyLong_FromVoidPtr(call.fault_addr) : PyLong_FromLong(0);
done:
    if (have_chunk)
        PyBuffer_Release(&chunk);
    PyBuffer_Release(&outer);
    PyBuffer_Release(&ids);
    return result;
}

static PyObject *install(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (ensure_installed() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *tune(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t stream = stream_min_bytes, part = part_min_bytes;
    if (!PyArg_ParseTuple(args, "|nn", &stream, &part))
        return NULL;
    if (stream < 0 || part < 1) {
        PyErr_SetString(PyExc_ValueError, "stream_min_bytes >= 0 and part_min_bytes >= 1");
        return NULL;
    }
    PyObject *before = Py_BuildValue("(nn)", stream_min_bytes, part_min_bytes);
    stream_min_bytes = stream, part_min_bytes = part;
    return before;
}

static PyMethodDef methods[] = {
    {"copy_blocks", copy_blocks, METH_VARARGS,
     "copy_blocks(outer, ids, num_blocks, stride, plane_bytes, chunk, chunk_blocks, first, "
     "to_engine, threads=1) -> 0, or an address whose access raised SIGBUS (the copy "
     "stopped; what it wrote is undefined)"},
    {"install", install, METH_NOARGS,
     "Install the SIGBUS handler now (copy_blocks also does, if it was replaced)."},
    {"_tune", tune, METH_VARARGS,
     "_tune(stream_min_bytes=current, part_min_bytes=current) -> the previous pair. "
     "For the profile script and tests: copies of at least stream_min_bytes stream their "
     "stores; each thread gets at least part_min_bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blockcopy",
    .m_doc = "SIGBUS-guarded block copies (see the C source).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__blockcopy(void)
{
#ifdef HAVE_STREAMING
    stream_init();
#endif
    if (pool_init() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyModule_Create(&module);
}

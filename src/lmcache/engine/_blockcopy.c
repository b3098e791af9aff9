/* Whole-block copies between a peer's KV memory and a chunk buffer, guarded against SIGBUS.
 *
 * Why this is C: the server maps an engine's KV segment (a tmpfs file the engine owns).
 * If the engine truncates or shrinks that file, the next load or store through the
 * mapping past the new end raises SIGBUS, whose default action kills the whole server
 * (every engine loses its cache). Reading the file through its descriptor (preadv/pwritev)
 * cannot fault, but measured at half the speed of a mapped copy; copies in a helper
 * process cost one process hop per chunk. Here the copy runs through the mapping at
 * memcpy speed, and a SIGBUS raised by the copying thread *while it copies* unwinds to
 * the start of the copy (sigsetjmp/siglongjmp), which then reports the faulting address
 * instead of dying. A SIGBUS anywhere else is handed to whatever handled it before us
 * (Python's faulthandler, or the default action), exactly as if we were not installed.
 *
 *     copy_blocks(outer, ids, num_blocks, stride, plane_bytes, chunk, chunk_blocks,
 *                 first, to_engine) -> 0 | faulting address
 *
 *     peer memory, one (layer, plane) row          chunk buffer [rows][chunk_blocks][pb]
 *     outer[r] -> [b0][b1][b2][b3][b4][b5] ...      row r: [  ][  ][ids[0]][ids[1]]...
 *                          stride between blocks                ^ first
 *
 * `outer` holds one absolute address per row (uint64): the caller keeps the memory they
 * point into alive and checked the layout's span (`lmcache.engine.transfer`); block ids
 * and the chunk buffer's size are checked here. The GIL is released while copying.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    sigjmp_buf env;
    void *volatile fault_addr;
} Guard;

/* The guard of the copy this thread is running, NULL outside a copy. SIGBUS from a memory
 * access is delivered to the thread that faulted, so a thread-local guard is exact. */
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

/* One row pair at a time; runs of consecutive block ids become one memcpy when the blocks
 * of a row are packed (stride == plane_bytes). */
static void copy_rows(const uint64_t *outer, Py_ssize_t rows, const int64_t *ids, Py_ssize_t n,
                      Py_ssize_t stride, Py_ssize_t pb, char *chunk, Py_ssize_t chunk_blocks,
                      Py_ssize_t first, int to_engine)
{
    int packed = stride == pb;
    for (Py_ssize_t r = 0; r < rows; r++) {
        char *row = (char *)(uintptr_t)outer[r];
        char *buf = chunk + (r * chunk_blocks + first) * pb;
        Py_ssize_t j = 0;
        while (j < n) {
            Py_ssize_t run = 1;
            if (packed)
                while (j + run < n && ids[j + run] == ids[j] + run)
                    run++;
            char *peer = row + ids[j] * stride;
            char *mine = buf + j * pb;
            if (to_engine)
                memcpy(peer, mine, (size_t)(run * pb));
            else
                memcpy(mine, peer, (size_t)(run * pb));
            j += run;
        }
    }
}

static PyObject *copy_blocks(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer outer, ids, chunk;
    Py_ssize_t num_blocks, stride, pb, chunk_blocks, first;
    PyObject *chunk_obj;
    int to_engine;
    if (!PyArg_ParseTuple(args, "y*y*nnnOnnp", &outer, &ids, &num_blocks, &stride, &pb,
                          &chunk_obj, &chunk_blocks, &first, &to_engine))
        return NULL;
    PyObject *result = NULL;
    int have_chunk = 0;
    const char *problem = NULL;
    if (outer.len % 8 || ids.len % 8)
        problem = "outer and ids must be arrays of 8-byte integers";
    else if (pb <= 0 || stride < pb || num_blocks <= 0 || chunk_blocks <= 0 || first < 0)
        problem = "plane_bytes, stride, num_blocks and chunk_blocks must be positive";
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
    Guard guard;
    guard.fault_addr = NULL;
    int faulted;
    Py_BEGIN_ALLOW_THREADS
    faulted = sigsetjmp(guard.env, 1);
    if (!faulted) {
        current_guard = &guard;
        copy_rows((const uint64_t *)outer.buf, rows, id, n, stride, pb, (char *)chunk.buf,
                  chunk_blocks, first, to_engine);
    }
    current_guard = NULL;
    Py_END_ALLOW_THREADS
    if (faulted)
        result = PyLong_FromVoidPtr(guard.fault_addr ? guard.fault_addr : (void *)1);
    else
        result = PyLong_FromLong(0);
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

static PyMethodDef methods[] = {
    {"copy_blocks", copy_blocks, METH_VARARGS,
     "copy_blocks(outer, ids, num_blocks, stride, plane_bytes, chunk, chunk_blocks, first, "
     "to_engine) -> 0, or the address whose access raised SIGBUS (the copy stopped there)"},
    {"install", install, METH_NOARGS,
     "Install the SIGBUS handler now (copy_blocks also does, if it was replaced)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blockcopy",
    .m_doc = "SIGBUS-guarded block copies (see the C source).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__blockcopy(void) { return PyModule_Create(&module); }

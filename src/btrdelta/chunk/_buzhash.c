/*
 * btrdelta.chunk._buzhash: cut points of casync's content-defined chunker, in C.
 *
 * The rule (docs/formats/casync.md, from casync's description of its chunker): a 48-byte
 * buzhash window; the hash after the byte that makes a chunk s bytes long is
 *     h = XOR over k = 0..47 of rol32(T[b[end - 48 + k]], 47 - k)
 * (a pure function of the window's bytes, rolled here one byte at a time); the chunk ends at
 * the first s >= max(min, 48) with s == max or h % d == d - 1 (d, the discriminator, comes
 * from the average size). The last chunk ends at the end of the input. buzhash.py holds the
 * same rule in Python (the reference, used when this module is not built) and the table,
 * which reaches this file through _constants.h (scripts/gen_constants.py).
 *
 * cuts(buf, start, stop, min, max, d) -> list of chunk end offsets for the chunks that start
 * at start and at each following cut, until a chunk starts at or after stop. Runs without
 * the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "_constants.h"

#define WINDOW BUZHASH_WINDOW

static const uint32_t T[256] = BUZHASH_TABLE_INIT;

static inline uint32_t rol32(uint32_t x, unsigned i) {
    i &= 31;
    return i ? (x << i) | (x >> (32 - i)) : x;
}

/* a % d for a 32-bit a, with m = 2^64 / d + 1 precomputed (Lemire's "fastmod"): the
 * division per byte was most of the chunker's time */
static inline uint32_t fastmod(uint32_t a, uint64_t m, uint32_t d) {
    uint64_t low = m * a;
    return (uint32_t)(((unsigned __int128)low * d) >> 64);
}

/* End offset of the chunk starting at pos (the input ends at n). */
static size_t chunk_end(const uint8_t *b, size_t n, size_t pos, size_t min, size_t max,
                        uint32_t d) {
    const uint64_t m = UINT64_MAX / d + 1;
    size_t first = min > WINDOW ? min : WINDOW;
    if (n - pos <= first)
        return n;
    size_t end = pos + first, last = pos + max < n ? pos + max : n;
    uint32_t h = 0;
    for (size_t k = 0; k < WINDOW; k++)
        h ^= rol32(T[b[end - WINDOW + k]], WINDOW - 1 - k);
    for (;;) {
        if (end - pos >= max || fastmod(h, m, d) == d - 1)
            return end;
        if (end >= last)
            return end;
        h = rol32(h, 1) ^ rol32(T[b[end - WINDOW]], WINDOW) ^ T[b[end]];
        end++;
    }
}

static PyObject *cuts(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t start, stop, min, max, d;
    if (!PyArg_ParseTuple(args, "y*nnnnn", &buf, &start, &stop, &min, &max, &d))
        return NULL;
    size_t n = (size_t)buf.len;
    if (start < 0 || stop < start || (size_t)start > n || min < 1 || max < WINDOW ||
        max < min || d < 1 || d > 0xffffffffL) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "bad chunker arguments");
        return NULL;
    }
    size_t cap = 64, count = 0;
    size_t *ends = PyMem_RawMalloc(cap * sizeof(size_t));
    if (ends == NULL) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    int oom = 0;
    size_t pos = (size_t)start;
    Py_BEGIN_ALLOW_THREADS
    while (pos < n && pos < (size_t)stop) {
        size_t end = chunk_end(buf.buf, n, pos, (size_t)min, (size_t)max, (uint32_t)d);
        if (count == cap) {
            size_t *bigger = PyMem_RawRealloc(ends, 2 * cap * sizeof(size_t));
            if (bigger == NULL) {
                oom = 1;
                break;
            }
            ends = bigger;
            cap *= 2;
        }
        ends[count++] = end;
        pos = end;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyObject *out = oom ? PyErr_NoMemory() : PyList_New((Py_ssize_t)count);
    for (size_t i = 0; out != NULL && i < count; i++) {
        PyObject *v = PyLong_FromSize_t(ends[i]);
        if (v == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    PyMem_RawFree(ends);
    return out;
}

static PyMethodDef methods[] = {
    {"cuts", cuts, METH_VARARGS, "End offsets of casync chunks from start until stop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.chunk._buzhash",
    "casync's buzhash chunker (cut points only).", -1, methods,
};

PyMODINIT_FUNC PyInit__buzhash(void) { return PyModule_Create(&module); }

/*
 * btrdelta.send._blockhash: the seeded XXH3-128 of every 4 KiB block of a buffer, in C.
 *
 * A sendshot record holds, per regular file, the seeded XXH3-128 of every 4 KiB block of its
 * data ranges (docs/formats/sendshot.md). onepass.py makes them in Python with one
 * xxhash.xxh3_128_digest call per block (the reference, used when this module is not built);
 * this module makes all of a buffer's in one call.
 *
 * blocks(buf, seed) -> bytes: for each 4096-byte block of buf (the last one may be shorter),
 * XXH3_128bits_withSeed(block, seed mod 2**64) in its canonical form (16 bytes, big-endian:
 * what python-xxhash's digest() returns), concatenated. Runs without the GIL for buffers of more
 * than a few blocks. xxHash comes from the system's header (Debian: libxxhash-dev), inlined
 * (XXH_INLINE_ALL): nothing to link at run time.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "_constants.h"

#define BLOCK SENDSHOT_BLOCK
/* buffers of at least this many bytes are hashed without the GIL */
#define NOGIL_MIN (16 * BLOCK)

static void hash_blocks(const uint8_t *p, size_t n, uint64_t seed, uint8_t *out) {
    for (size_t off = 0; off < n; off += BLOCK, out += sizeof(XXH128_canonical_t)) {
        size_t len = n - off < BLOCK ? n - off : BLOCK;
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits_withSeed(p + off, len, seed));
        memcpy(out, c.digest, sizeof c.digest);
    }
}

static PyObject *blocks(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *seed_obj;
    if (!PyArg_ParseTuple(args, "y*O!", &buf, &PyLong_Type, &seed_obj))
        return NULL;
    /* modulo 2**64, as python-xxhash takes a seed */
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(seed_obj);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    size_t n = (size_t)buf.len;
    size_t count = (n + BLOCK - 1) / BLOCK;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * 16));
    if (out == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    if (n >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        hash_blocks(buf.buf, n, (uint64_t)seed, dst);
        Py_END_ALLOW_THREADS
    } else {
        hash_blocks(buf.buf, n, (uint64_t)seed, dst);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"blocks", blocks, METH_VARARGS,
     "blocks(buf, seed) -> the seeded XXH3-128 digests of buf's 4 KiB blocks, concatenated."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.send._blockhash",
    "Seeded XXH3-128 of every 4 KiB block of a buffer (sendshot records).", -1, methods,
};

PyMODINIT_FUNC PyInit__blockhash(void) { return PyModule_Create(&module); }

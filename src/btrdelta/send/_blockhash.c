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
 *
 * x3_update(state, buf), x3_zeros(state, n), x3_digest(state) -> bytes: XXH3-128 (seed 0,
 * the default secret) of content fed in order, where a run of n zero bytes (a file's hole) is
 * fed by its length. state is a writable buffer of X3_STATE_SIZE zero bytes (a fresh
 * bytearray). The digest equals xxhash.xxh3_128_digest of the same bytes (the tests check it
 * against python-xxhash). XXH3's long-input hash keeps eight 64-bit lanes; a 64-byte stripe of
 * zeros adds to each lane a constant of the secret (data ^ key is the key), and a whole
 * 1024-byte block of zeros maps each lane through x -> ((x + C) ^ (x + C) >> 47 ^ S) * P
 * (the stripes' sum C, then the scramble): a few operations per KiB of a hole instead of
 * hashing its bytes (~150 GB/s of holes on one core against ~18 GB/s of zeros through
 * xxhash). The per-stripe, per-block and merge steps are written here from the XXH3
 * specification (xxhash's doc/xxhash_spec.md); inputs of at most 240 bytes (their own
 * algorithm) are handed to xxhash's XXH3_128bits.
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


/* -- XXH3-128 with runs of zeros by length ------------------------------------------------ */

#define X3_STRIPE 64
#define X3_LANES 8
#define X3_SECRET_SIZE XXH3_SECRET_DEFAULT_SIZE
#define X3_PER_BLOCK ((X3_SECRET_SIZE - X3_STRIPE) / 8) /* stripes a block: 16 */
#define X3_SHORT 240                                    /* XXH3_MIDSIZE_MAX */
#define X3_P32_1 0x9E3779B1ULL

typedef struct {
    XXH_ALIGN(64) uint64_t acc[X3_LANES];
    uint64_t total;
    uint32_t nbuf;   /* bytes in buf (1..64 once anything was fed): its stripe is not hashed
                        until more bytes follow (the last stripe is hashed apart) */
    uint32_t stripe; /* stripes hashed in the current block */
    uint32_t init;
    uint8_t buf[X3_STRIPE];
    uint8_t prev[X3_STRIPE]; /* the last stripe hashed (the final stripe may overlap it) */
    uint8_t head[X3_SHORT];  /* the first bytes: inputs up to X3_SHORT are hashed whole */
} x3_state;

#define X3_STATE_SIZE ((Py_ssize_t)sizeof(x3_state))

/* per stripe s and lane i, what a stripe of zeros adds; per lane, a block's sum of them and
 * the scramble's key */
static uint64_t x3_zero[X3_PER_BLOCK][X3_LANES], x3_block[X3_LANES], x3_skey[X3_LANES];

static void x3_tables(void) {
    for (int i = 0; i < X3_LANES; i++) {
        uint64_t sum = 0;
        for (int s = 0; s < X3_PER_BLOCK; s++) {
            uint64_t key = XXH_readLE64(XXH3_kSecret + 8 * s + 8 * i);
            x3_zero[s][i] = (key & 0xFFFFFFFFULL) * (key >> 32);
            sum += x3_zero[s][i];
        }
        x3_block[i] = sum;
        x3_skey[i] = XXH_readLE64(XXH3_kSecret + X3_SECRET_SIZE - X3_STRIPE + 8 * i);
    }
}

static void x3_accumulate(uint64_t *acc, const uint8_t *p, const uint8_t *secret) {
    for (int i = 0; i < X3_LANES; i++) {
        uint64_t v = XXH_readLE64(p + 8 * i);
        uint64_t k = v ^ XXH_readLE64(secret + 8 * i);
        acc[i ^ 1] += v;
        acc[i] += (k & 0xFFFFFFFFULL) * (k >> 32);
    }
}

static void x3_stripe(x3_state *st, const uint8_t *p) {
    XXH3_accumulate_512(st->acc, p, XXH3_kSecret + 8 * st->stripe);
    if (++st->stripe == X3_PER_BLOCK) {
        XXH3_scrambleAcc(st->acc, XXH3_kSecret + X3_SECRET_SIZE - X3_STRIPE);
        st->stripe = 0;
    }
}

/* q stripes of zeros */
static void x3_zero_stripes(x3_state *st, uint64_t q) {
    uint64_t *acc = st->acc;
    while (q && st->stripe) {
        for (int i = 0; i < X3_LANES; i++)
            acc[i] += x3_zero[st->stripe][i];
        if (++st->stripe == X3_PER_BLOCK) {
            XXH3_scrambleAcc(acc, XXH3_kSecret + X3_SECRET_SIZE - X3_STRIPE);
            st->stripe = 0;
        }
        q--;
    }
    if (!q)
        return;
    /* whole blocks of zeros: per lane, add the stripes' sum, scramble; the eight lanes in
     * registers, independent: ~4x the speed of a vector scramble through memory */
    uint64_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    uint64_t a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
#define X3_LANE(a, i)                                                                          \
    do {                                                                                       \
        uint64_t x_ = a + x3_block[i];                                                         \
        x_ ^= x_ >> 47;                                                                        \
        a = (x_ ^ x3_skey[i]) * X3_P32_1;                                                      \
    } while (0)
    for (uint64_t b = q / X3_PER_BLOCK; b; b--) {
        X3_LANE(a0, 0); X3_LANE(a1, 1); X3_LANE(a2, 2); X3_LANE(a3, 3);
        X3_LANE(a4, 4); X3_LANE(a5, 5); X3_LANE(a6, 6); X3_LANE(a7, 7);
    }
#undef X3_LANE
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
    for (uint64_t r = 0; r < q % X3_PER_BLOCK; r++) {
        for (int i = 0; i < X3_LANES; i++)
            acc[i] += x3_zero[r][i];
    }
    st->stripe = (uint32_t)(q % X3_PER_BLOCK);
}

static void x3_start(x3_state *st) {
    if (!st->init) {
        static const uint64_t init[X3_LANES] = {
            XXH_PRIME32_3, XXH_PRIME64_1, XXH_PRIME64_2, XXH_PRIME64_3,
            XXH_PRIME64_4, XXH_PRIME32_2, XXH_PRIME64_5, XXH_PRIME32_1};
        memcpy(st->acc, init, sizeof init);
        st->init = 1;
    }
}

/* n bytes at p, or n zeros when p is NULL (into an aligned copy of the state at st, which
 * lives in a Python buffer: the vector code wants its lanes aligned) */
static void x3_feed(void *state, const uint8_t *p, uint64_t n) {
    x3_state copy, *st = &copy;
    memcpy(st, state, sizeof copy);
    x3_start(st);
    if (st->total < X3_SHORT) {
        size_t k = n < X3_SHORT - st->total ? (size_t)n : (size_t)(X3_SHORT - st->total);
        if (p)
            memcpy(st->head + st->total, p, k);
        else
            memset(st->head + st->total, 0, k);
    }
    st->total += n;
    while (n) {
        if (st->nbuf == X3_STRIPE) { /* more follows: the buffered stripe is not the last */
            x3_stripe(st, st->buf);
            memcpy(st->prev, st->buf, X3_STRIPE);
            st->nbuf = 0;
        }
        if (st->nbuf == 0 && n > X3_STRIPE) { /* whole stripes, the last 1..64 bytes kept */
            uint64_t q = (n - 1) / X3_STRIPE;
            if (p) {
                for (uint64_t j = 0; j < q; j++)
                    x3_stripe(st, p + j * X3_STRIPE);
                memcpy(st->prev, p + (q - 1) * X3_STRIPE, X3_STRIPE);
                p += q * X3_STRIPE;
            } else {
                x3_zero_stripes(st, q);
                memset(st->prev, 0, X3_STRIPE);
            }
            n -= q * X3_STRIPE;
        }
        size_t k = X3_STRIPE - st->nbuf < n ? X3_STRIPE - st->nbuf : (size_t)n;
        if (p) {
            memcpy(st->buf + st->nbuf, p, k);
            p += k;
        } else {
            memset(st->buf + st->nbuf, 0, k);
        }
        st->nbuf += (uint32_t)k;
        n -= k;
    }
    memcpy(state, st, sizeof copy);
}

static uint64_t x3_merge(const uint64_t *acc, const uint8_t *secret, uint64_t start) {
    uint64_t h = start;
    for (int i = 0; i < 4; i++) {
        unsigned __int128 m = (unsigned __int128)(acc[2 * i] ^ XXH_readLE64(secret + 16 * i)) *
                              (acc[2 * i + 1] ^ XXH_readLE64(secret + 16 * i + 8));
        h += (uint64_t)m ^ (uint64_t)(m >> 64);
    }
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

static XXH128_hash_t x3_digest_of(const void *state) {
    x3_state copy, *st = &copy;
    memcpy(st, state, sizeof copy);
    if (st->total <= X3_SHORT)
        return XXH3_128bits(st->head, (size_t)st->total);
    uint64_t acc[X3_LANES];
    uint8_t last[X3_STRIPE];
    memcpy(acc, st->acc, sizeof acc);
    memcpy(last, st->prev + st->nbuf, X3_STRIPE - st->nbuf); /* (none when buf is full) */
    memcpy(last + X3_STRIPE - st->nbuf, st->buf, st->nbuf);
    x3_accumulate(acc, last, XXH3_kSecret + X3_SECRET_SIZE - X3_STRIPE - 7);
    XXH128_hash_t h;
    h.low64 = x3_merge(acc, XXH3_kSecret + 11, st->total * XXH_PRIME64_1);
    h.high64 = x3_merge(acc, XXH3_kSecret + X3_SECRET_SIZE - X3_STRIPE - 11,
                        ~(st->total * XXH_PRIME64_2));
    return h;
}

static int x3_state_of(Py_buffer *state) {
    if (state->len != X3_STATE_SIZE) {
        PyBuffer_Release(state);
        PyErr_Format(PyExc_ValueError, "x3 state must be %zd bytes", X3_STATE_SIZE);
        return -1;
    }
    return 0;
}

static PyObject *x3_update(PyObject *self, PyObject *args) {
    Py_buffer state, buf;
    if (!PyArg_ParseTuple(args, "w*y*", &state, &buf))
        return NULL;
    if (x3_state_of(&state) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (buf.len >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        x3_feed(state.buf, buf.buf, (uint64_t)buf.len);
        Py_END_ALLOW_THREADS
    } else {
        x3_feed(state.buf, buf.buf, (uint64_t)buf.len);
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&state);
    Py_RETURN_NONE;
}

static PyObject *x3_zeros(PyObject *self, PyObject *args) {
    Py_buffer state;
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "w*K", &state, &n))
        return NULL;
    if (x3_state_of(&state) < 0)
        return NULL;
    if (n >= (1ULL << 24)) {
        Py_BEGIN_ALLOW_THREADS
        x3_feed(state.buf, NULL, n);
        Py_END_ALLOW_THREADS
    } else {
        x3_feed(state.buf, NULL, n);
    }
    PyBuffer_Release(&state);
    Py_RETURN_NONE;
}

static PyObject *x3_digest(PyObject *self, PyObject *args) {
    Py_buffer state;
    if (!PyArg_ParseTuple(args, "w*", &state))
        return NULL;
    if (x3_state_of(&state) < 0)
        return NULL;
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, x3_digest_of(state.buf));
    PyBuffer_Release(&state);
    return PyBytes_FromStringAndSize((const char *)c.digest, sizeof c.digest);
}

static PyMethodDef methods[] = {
    {"blocks", blocks, METH_VARARGS,
     "blocks(buf, seed) -> the seeded XXH3-128 digests of buf's 4 KiB blocks, concatenated."},
    {"x3_update", x3_update, METH_VARARGS,
     "x3_update(state, buf): feed buf to the XXH3-128 state (a bytearray of X3_STATE_SIZE)."},
    {"x3_zeros", x3_zeros, METH_VARARGS, "x3_zeros(state, n): feed n zero bytes, by length."},
    {"x3_digest", x3_digest, METH_VARARGS,
     "x3_digest(state) -> the XXH3-128 digest (canonical, 16 bytes) of what was fed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.send._blockhash",
    "Seeded XXH3-128 of every 4 KiB block of a buffer (sendshot records).", -1, methods,
};

PyMODINIT_FUNC PyInit__blockhash(void) {
    x3_tables();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "X3_STATE_SIZE", (long)X3_STATE_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/*
 * btrdelta.stream._speedups: optional C accelerator for the send-stream hot loops.
 *
 * Strategy: this module owns no format knowledge of its own. Python hands it, once, the
 * decoding plan derived from constants.COMMAND_SPECS (configure()): per command number the
 * record class and, for v1 and v2+ streams, the attributes in kernel order with their kind
 * and record position. decode_batch() then does what StreamParser._decode_batch_py does:
 * decode every complete command whose attributes are exactly in that order, CRC checked,
 * and stop at the first command it does not handle (bad CRC, unusual layout, a command
 * split across buffers, an oversized length, an unknown command) so that the Python slow
 * path produces the precise error. END ends the batch.
 *
 * encode_head() encodes a record as codec.encode_record does (the writer's hot path) and
 * hands anything unusual back to it in the same way.
 *
 * render_dump() renders `btrfs receive --dump` lines like TextDumper.render for the common
 * commands; anything unusual (subvol/snapshot, paths needing progs' path_cat_out rules, a
 * value of an unexpected type) is handed to the Python renderer one record at a time, so
 * the Python code stays the reference for every corner.
 *
 * Input is untrusted: every length is checked against the command end before use, and no
 * allocation is sized by a field that has not been checked against the buffer.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_constants.h" /* generated: command numbers, CMD_HEADER_SIZE, NVERSIONS */

#if defined(__GLIBC__)
#include <malloc.h> /* mallopt: btrdelta._malloc's settings without ctypes */
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <nmmintrin.h>
#define HAVE_X86_CRC 1
#endif

/* ---------------------------------------------------------------------------------------
 * little-endian loads */

static inline uint16_t
le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t
le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static inline void
put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void
put_le64(uint8_t *p, uint64_t v)
{
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---------------------------------------------------------------------------------------
 * CRC32C, btrfs flavour: the raw register (seed given, no inversion in or out). */

#define CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];

static void
crc_sw_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[k][n] = c;
        }
    }
}

/* slicing-by-8 */
static uint32_t
crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w = le64(p) ^ crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
              crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
              crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#ifdef HAVE_X86_CRC
/*
 * SSE4.2: three interleaved streams over long and short blocks, combined with "shift by
 * n zero bytes" tables (Mark Adler's construction), so the crc32 instruction's 3-cycle
 * latency is hidden and large file data is checked at memory speed.
 */
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t crc_long[4][256];
static uint32_t crc_short[4][256];
static int have_hw_crc;

static uint32_t
gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void
gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* operator that appends len zero bytes to a CRC register */
static void
crc_zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = CRC32C_POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_square(even, odd); /* two zero bits */
    gf2_square(odd, even); /* four zero bits */
    do {
        gf2_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void
crc_zeros(uint32_t zeros[][256], size_t len)
{
    uint32_t op[32];
    crc_zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_times(op, n);
        zeros[1][n] = gf2_times(op, n << 8);
        zeros[2][n] = gf2_times(op, n << 16);
        zeros[3][n] = gf2_times(op, n << 24);
    }
}

static inline uint32_t
crc_shift(uint32_t zeros[][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

static inline uint64_t
load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

__attribute__((target("sse4.2"))) static uint32_t
crc_hw(uint32_t crc, const uint8_t *next, size_t len)
{
    uint64_t crc0 = crc, crc1, crc2;
    const uint8_t *end;

    while (len && ((uintptr_t)next & 7)) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    while (len >= CRC_LONG * 3) {
        crc1 = 0;
        crc2 = 0;
        end = next + CRC_LONG;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(next));
            crc1 = _mm_crc32_u64(crc1, load64(next + CRC_LONG));
            crc2 = _mm_crc32_u64(crc2, load64(next + 2 * CRC_LONG));
            next += 8;
        } while (next < end);
        crc0 = crc_shift(crc_long, (uint32_t)crc0) ^ crc1;
        crc0 = crc_shift(crc_long, (uint32_t)crc0) ^ crc2;
        next += 2 * CRC_LONG;
        len -= 3 * CRC_LONG;
    }
    while (len >= CRC_SHORT * 3) {
        crc1 = 0;
        crc2 = 0;
        end = next + CRC_SHORT;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(next));
            crc1 = _mm_crc32_u64(crc1, load64(next + CRC_SHORT));
            crc2 = _mm_crc32_u64(crc2, load64(next + 2 * CRC_SHORT));
            next += 8;
        } while (next < end);
        crc0 = crc_shift(crc_short, (uint32_t)crc0) ^ crc1;
        crc0 = crc_shift(crc_short, (uint32_t)crc0) ^ crc2;
        next += 2 * CRC_SHORT;
        len -= 3 * CRC_SHORT;
    }
    while (len >= 8) {
        crc0 = _mm_crc32_u64(crc0, load64(next));
        next += 8;
        len -= 8;
    }
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    return (uint32_t)crc0;
}
#endif /* HAVE_X86_CRC */

static inline uint32_t
crc_update(uint32_t crc, const uint8_t *p, size_t len)
{
#ifdef HAVE_X86_CRC
    if (have_hw_crc)
        return crc_hw(crc, p, len);
#endif
    return crc_sw(crc, p, len);
}

/* crc_update for other C modules (the capsule _crc_update) */
static uint32_t
crc_update_ext(uint32_t crc, const uint8_t *p, size_t len)
{
    return crc_update(crc, p, len);
}

static inline int
crc_is_hw(void)
{
#ifdef HAVE_X86_CRC
    return have_hw_crc;
#else
    return 0;
#endif
}

static void
crc_init(void)
{
    crc_sw_init();
#ifdef HAVE_X86_CRC
    __builtin_cpu_init();
    have_hw_crc = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (have_hw_crc) {
        crc_zeros(crc_long, CRC_LONG);
        crc_zeros(crc_short, CRC_SHORT);
    }
#endif
}

/* ---------------------------------------------------------------------------------------
 * the decoding plan (set once by configure()) */

enum { K_U8, K_U32, K_U64, K_UUID, K_TIMESPEC, K_BYTES, K_DATA, K_COUNT };
static const uint32_t fixed_size[K_COUNT] = {1, 4, 8, 16, 12, 0, 0};

#define NCMD 64  /* command numbers accepted by configure() */
#define MAXF 12  /* record fields per command */

typedef struct {
    uint16_t attr;
    uint8_t kind;
    uint8_t pos;
    uint8_t optional; /* absent from the command: the record field stays None */
} FieldPlan;

typedef struct {
    PyObject *cls; /* record class, NULL when the command number is not defined */
    PyObject *names; /* its fields in record order (__match_args__), for encoding; or NULL */
    int nfields;
    int nplan[2]; /* [0]: v1 streams, [1]: v2+ streams */
    FieldPlan plan[2][MAXF];
} CmdPlan;

static CmdPlan cmds[NCMD];
static uint32_t max_cmd[NVERSIONS];
static uint32_t max_payload[NVERSIONS];
static long end_cmd = -1;
static PyObject *uuid_cls;
static PyObject *kw_bytes; /* ("bytes",) */
/*
 * Without hardware CRC here (not x86, or no SSE4.2) large file data is checked by the
 * Python CRC32C library instead (crc32c.crc32c(data, value), standard convention), which
 * has its own hardware paths (ARMv8 crc, ...): the table runs at ~1-2 GB/s only.
 */
static PyObject *lib_crc;
#define LIB_CRC_MIN 4096
static int configured;

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *ucls, *commands, *limits, *crcf = Py_None;
    long endc;
    if (!PyArg_ParseTuple(args, "OOOl|O:configure", &ucls, &commands, &limits, &endc, &crcf))
        return NULL;
    if (crcf != Py_None && !PyCallable_Check(crcf)) {
        PyErr_SetString(PyExc_TypeError, "crc function must be callable or None");
        return NULL;
    }
    if (!PyTuple_Check(commands) || PyTuple_GET_SIZE(commands) > NCMD) {
        PyErr_SetString(PyExc_ValueError, "commands: a tuple of at most 64 entries");
        return NULL;
    }
    if (!PyTuple_Check(limits) || PyTuple_GET_SIZE(limits) != NVERSIONS) {
        PyErr_SetString(PyExc_ValueError, "limits: a tuple of 4 (max_cmd, max_payload)");
        return NULL;
    }
    if (endc < 0 || endc >= PyTuple_GET_SIZE(commands)) {
        PyErr_SetString(PyExc_ValueError, "end command out of range");
        return NULL;
    }
    CmdPlan fresh[NCMD];
    uint32_t mc[NVERSIONS], mp[NVERSIONS];
    memset(fresh, 0, sizeof(fresh));
    for (Py_ssize_t v = 0; v < NVERSIONS; v++) {
        unsigned long a, b;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(limits, v), "kk", &a, &b))
            return NULL;
        if (a >= NCMD || b > 0xFFFFFFF0ul) {
            PyErr_SetString(PyExc_ValueError, "limit out of range");
            return NULL;
        }
        mc[v] = (uint32_t)a;
        mp[v] = (uint32_t)b;
    }
    for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(commands); c++) {
        PyObject *entry = PyTuple_GET_ITEM(commands, c);
        PyObject *cls, *plans[2];
        int nfields;
        if (entry == Py_None)
            continue;
        if (!PyArg_ParseTuple(entry, "OiO!O!", &cls, &nfields, &PyTuple_Type, &plans[0],
                              &PyTuple_Type, &plans[1]))
            return NULL;
        if (nfields < 0 || nfields > MAXF || !PyCallable_Check(cls)) {
            PyErr_Format(PyExc_ValueError, "command %zd: bad class or field count", c);
            return NULL;
        }
        fresh[c].cls = cls;
        fresh[c].nfields = nfields;
        for (int v2 = 0; v2 < 2; v2++) {
            Py_ssize_t n = PyTuple_GET_SIZE(plans[v2]);
            if (n > nfields) {
                PyErr_Format(PyExc_ValueError, "command %zd: plan longer than record", c);
                return NULL;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                int attr, kind, pos, optional = 0;
                if (!PyArg_ParseTuple(PyTuple_GET_ITEM(plans[v2], i), "iii|p", &attr, &kind, &pos,
                                      &optional))
                    return NULL;
                if (attr <= 0 || attr > 0xFFFF || kind < 0 || kind >= K_COUNT || pos < 0 ||
                    pos >= nfields) {
                    PyErr_Format(PyExc_ValueError, "command %zd: bad field plan", c);
                    return NULL;
                }
                fresh[c].plan[v2][i].attr = (uint16_t)attr;
                fresh[c].plan[v2][i].kind = (uint8_t)kind;
                fresh[c].plan[v2][i].pos = (uint8_t)pos;
                fresh[c].plan[v2][i].optional = (uint8_t)optional;
            }
            fresh[c].nplan[v2] = (int)n;
        }
    }
    if (kw_bytes == NULL) {
        kw_bytes = Py_BuildValue("(s)", "bytes");
        if (kw_bytes == NULL)
            return NULL;
    }
    for (int c = 0; c < NCMD; c++) {
        if (fresh[c].cls != NULL) {
            /* the encoder reads fields by name: a tuple of nfields strings, else none */
            PyObject *names = PyObject_GetAttrString(fresh[c].cls, "__match_args__");
            if (names == NULL)
                PyErr_Clear();
            else if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != fresh[c].nfields)
                Py_CLEAR(names);
            else
                for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++)
                    if (!PyUnicode_Check(PyTuple_GET_ITEM(names, i))) {
                        Py_CLEAR(names);
                        break;
                    }
            fresh[c].names = names;
        }
    }
    for (int c = 0; c < NCMD; c++) {
        Py_XINCREF(fresh[c].cls);
        Py_XDECREF(cmds[c].cls);
        Py_XDECREF(cmds[c].names);
    }
    memcpy(cmds, fresh, sizeof(cmds));
    memcpy(max_cmd, mc, sizeof(mc));
    memcpy(max_payload, mp, sizeof(mp));
    Py_INCREF(ucls);
    Py_XSETREF(uuid_cls, ucls);
    if (crcf == Py_None)
        Py_CLEAR(lib_crc);
    else {
        Py_INCREF(crcf);
        Py_XSETREF(lib_crc, crcf);
    }
    end_cmd = endc;
    configured = 1;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------
 * decoding */

static PyObject *
timespec_value(int64_t sec, uint32_t nsec)
{
    long long ns;
    if (!__builtin_mul_overflow((long long)sec, 1000000000LL, &ns) &&
        !__builtin_add_overflow(ns, (long long)nsec, &ns))
        return PyLong_FromLongLong(ns);
    /* beyond int64 nanoseconds: let Python's ints do it */
    PyObject *s = PyLong_FromLongLong(sec), *m = NULL, *prod = NULL, *n = NULL, *res = NULL;
    if (s && (m = PyLong_FromLong(1000000000L)) && (prod = PyNumber_Multiply(s, m)) &&
        (n = PyLong_FromUnsignedLong(nsec)))
        res = PyNumber_Add(prod, n);
    Py_XDECREF(s);
    Py_XDECREF(m);
    Py_XDECREF(prod);
    Py_XDECREF(n);
    return res;
}

#define NOT_HANDLED ((PyObject *)1)

/*
 * Decode the payload base[p:end] of command `c` with the kernel-order plan. Returns a new
 * record, NOT_HANDLED (no exception set) when the layout is not the plain one, or NULL with
 * an exception set.
 */
static PyObject *
decode_one(const CmdPlan *cp, int v2, PyObject *mv, const uint8_t *base, size_t p, size_t end)
{
    PyObject *vals[MAXF];
    PyObject *rec = NOT_HANDLED;
    int nf = cp->nfields;
    memset(vals, 0, sizeof(vals));

    for (int i = 0; i < cp->nplan[v2]; i++) {
        const FieldPlan *f = &cp->plan[v2][i];
        PyObject *val;
        if (f->kind == K_DATA && v2) {
            if (end - p < 2 || le16(base + p) != f->attr)
                goto done;
            val = PySequence_GetSlice(mv, (Py_ssize_t)(p + 2), (Py_ssize_t)end);
            p = end;
        }
        else {
            if (end - p < 4 || le16(base + p) != f->attr) {
                if (f->optional)
                    continue;
                goto done;
            }
            uint16_t n = le16(base + p + 2);
            if ((size_t)n > end - p - 4)
                goto done;
            const uint8_t *v = base + p + 4;
            uint32_t want = fixed_size[f->kind];
            if (want && n != want)
                goto done;
            switch (f->kind) {
            case K_U8:
                val = PyLong_FromLong(v[0]);
                break;
            case K_U32:
                val = PyLong_FromUnsignedLong(le32(v));
                break;
            case K_U64:
                val = PyLong_FromUnsignedLongLong(le64(v));
                break;
            case K_TIMESPEC: {
                uint32_t nsec = le32(v + 8);
                if (nsec >= 1000000000u)
                    goto done;
                val = timespec_value((int64_t)le64(v), nsec);
                break;
            }
            case K_UUID: {
                PyObject *raw = PyBytes_FromStringAndSize((const char *)v, 16);
                if (raw == NULL) {
                    val = NULL;
                    break;
                }
                PyObject *kwv[1] = {raw};
                val = PyObject_Vectorcall(uuid_cls, kwv, 0, kw_bytes);
                Py_DECREF(raw);
                break;
            }
            case K_BYTES:
                val = PyBytes_FromStringAndSize((const char *)v, n);
                break;
            default: /* K_DATA in a v1 stream: a TLV like any other */
                val = PySequence_GetSlice(mv, (Py_ssize_t)(p + 4), (Py_ssize_t)(p + 4 + n));
                break;
            }
            p += 4 + (size_t)n;
        }
        if (val == NULL) {
            rec = NULL;
            goto done;
        }
        Py_XSETREF(vals[f->pos], val);
    }
    if (p != end)
        goto done;
    for (int i = 0; i < nf; i++) {
        if (vals[i] == NULL) {
            Py_INCREF(Py_None);
            vals[i] = Py_None;
        }
    }
    rec = PyObject_Vectorcall(cp->cls, vals, (size_t)nf, NULL);
done:
    for (int i = 0; i < nf; i++)
        Py_XDECREF(vals[i]);
    return rec;
}

/* continue the raw CRC register *crc over mv[start:end] with the Python library */
static int
lib_crc32c(PyObject *mv, size_t start, size_t end, uint32_t *crc)
{
    PyObject *piece = PySequence_GetSlice(mv, (Py_ssize_t)start, (Py_ssize_t)end);
    if (piece == NULL)
        return -1;
    PyObject *seed = PyLong_FromUnsignedLong(*crc ^ 0xFFFFFFFFu);
    if (seed == NULL) {
        Py_DECREF(piece);
        return -1;
    }
    PyObject *argv[2] = {piece, seed};
    PyObject *res = PyObject_Vectorcall(lib_crc, argv, 2, NULL);
    Py_DECREF(piece);
    Py_DECREF(seed);
    if (res == NULL)
        return -1;
    unsigned long v = PyLong_AsUnsignedLong(res);
    Py_DECREF(res);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    *crc = (uint32_t)v ^ 0xFFFFFFFFu;
    return 0;
}

PyDoc_STRVAR(decode_batch_doc,
"decode_batch(buf, pos, limit, version, verify_crc, /) -> (records, new_pos, hit_end)\n\n"
"Decode every complete, kernel-order command in buf[pos:limit]; stop at the first one that\n"
"needs the Python slow path, or after END (hit_end=True).");

static PyObject *
decode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "decode_batch takes 5 arguments");
        return NULL;
    }
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() has not been called");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    long version = PyLong_AsLong(args[3]);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    int verify = PyObject_IsTrue(args[4]);
    if (verify < 0)
        return NULL;
    if (version < 1 || version >= NVERSIONS) {
        PyErr_Format(PyExc_ValueError, "unsupported stream version %ld", version);
        return NULL;
    }

    PyObject *mv;
    if (PyMemoryView_Check(args[0])) {
        mv = args[0];
        Py_INCREF(mv);
    }
    else if ((mv = PyMemoryView_FromObject(args[0])) == NULL) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(mv, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(mv);
        return NULL;
    }
    PyObject *out = NULL, *recs = NULL;
    if (view.ndim > 1 || view.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "decode_batch needs a 1-D buffer of bytes");
        goto finish;
    }
    if (pos < 0 || limit < pos || limit > view.len) {
        PyErr_SetString(PyExc_ValueError, "pos/limit outside the buffer");
        goto finish;
    }
    recs = PyList_New(0);
    if (recs == NULL)
        goto finish;

    const uint8_t *base = (const uint8_t *)view.buf;
    const size_t lim = (size_t)limit;
    size_t p = (size_t)pos;
    const uint32_t maxp = max_payload[version];
    const uint32_t maxc = max_cmd[version];
    const int v2 = version >= 2;
    int hit_end = 0;
    static const uint8_t zero4[4] = {0, 0, 0, 0};

    while (lim - p >= CMD_HEADER_SIZE) {
        const uint8_t *h = base + p;
        uint32_t length = le32(h);
        uint16_t cmd = le16(h + 4);
        if (length > maxp || (size_t)length > lim - p - CMD_HEADER_SIZE)
            break;
        size_t end = p + CMD_HEADER_SIZE + length;
        if (verify) {
            uint32_t crc = crc_update(0, h, 6);
            crc = crc_update(crc, zero4, 4);
            if (length >= LIB_CRC_MIN && lib_crc != NULL && !crc_is_hw()) {
                if (lib_crc32c(mv, p + CMD_HEADER_SIZE, end, &crc) < 0)
                    goto finish;
            }
            else
                crc = crc_update(crc, h + CMD_HEADER_SIZE, length);
            if (crc != le32(h + 6))
                break;
        }
        if (cmd == 0 || cmd > maxc || cmd >= NCMD || cmds[cmd].cls == NULL)
            break;
        PyObject *rec = decode_one(&cmds[cmd], v2, mv, base, p + CMD_HEADER_SIZE, end);
        if (rec == NOT_HANDLED)
            break;
        if (rec == NULL)
            goto finish;
        int rc = PyList_Append(recs, rec);
        Py_DECREF(rec);
        if (rc < 0)
            goto finish;
        p = end;
        if ((long)cmd == end_cmd) {
            hit_end = 1;
            break;
        }
    }
    out = Py_BuildValue("(OnO)", recs, (Py_ssize_t)p, hit_end ? Py_True : Py_False);
finish:
    Py_XDECREF(recs);
    PyBuffer_Release(&view);
    Py_DECREF(mv);
    return out;
}

/* ---------------------------------------------------------------------------------------
 * dump rendering */

typedef struct {
    char *buf;
    size_t len, cap;
} Out;

static int
out_reserve(Out *o, size_t n)
{
    if (o->cap - o->len >= n)
        return 0;
    size_t cap = o->cap ? o->cap : 65536;
    while (cap - o->len < n) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *nb = PyMem_Realloc(o->buf, cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = nb;
    o->cap = cap;
    return 0;
}

static inline int
out_put(Out *o, const char *s, size_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    return 0;
}

#define OUT_LIT(o, s) out_put((o), (s), sizeof(s) - 1)

/* progs' print_path_escaped, as dump.escape_path: up to the first NUL, escaped */
static const char *esc_table[256];
static char esc_store[256][5];

static void
esc_init(void)
{
    for (int b = 0; b < 256; b++) {
        const char *e = NULL;
        switch (b) {
        case 7: e = "\\a"; break;
        case 8: e = "\\b"; break;
        case 27: e = "\\e"; break;
        case 12: e = "\\f"; break;
        case 10: e = "\\n"; break;
        case 13: e = "\\r"; break;
        case 9: e = "\\t"; break;
        case 11: e = "\\v"; break;
        case 32: e = "\\ "; break;
        case 92: e = "\\\\"; break;
        }
        if (e)
            strcpy(esc_store[b], e);
        else if (b >= 0x20 && b <= 0x7e) {
            esc_store[b][0] = (char)b;
            esc_store[b][1] = 0;
        }
        else
            snprintf(esc_store[b], sizeof(esc_store[b]), "\\%03o", b);
        esc_table[b] = esc_store[b];
    }
}

static inline int
is_plain(uint8_t b)
{
    return b >= 0x21 && b <= 0x7e && b != 0x5c;
}

/* append escaped s[0:n] (cut at NUL); returns characters written or -1 */
static Py_ssize_t
out_escaped(Out *o, const uint8_t *s, size_t n)
{
    const uint8_t *nul = memchr(s, 0, n);
    if (nul)
        n = (size_t)(nul - s);
    if (out_reserve(o, n * 4) < 0)
        return -1;
    char *d = o->buf + o->len, *start = d;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = s[i];
        if (is_plain(b))
            *d++ = (char)b;
        else {
            const char *e = esc_table[b];
            while (*e)
                *d++ = *e++;
        }
    }
    o->len += (size_t)(d - start);
    return d - start;
}

/* a C string as printf %s prints it: up to the first NUL, raw */
static int
out_cstr(Out *o, const char *s, size_t n)
{
    const char *nul = memchr(s, 0, n);
    return out_put(o, s, nul ? (size_t)(nul - s) : n);
}

/* an int as Python formats it in base 10, 8 or 16; 1 if not a plain int in u64/i64 range */
static int
out_int(Out *o, PyObject *v, int base)
{
    if (!PyLong_CheckExact(v))
        return 1;
    int overflow;
    int neg = 0;
    unsigned long long mag;
    long long sv = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow == 0) {
        if (sv == -1 && PyErr_Occurred())
            return -1;
        neg = sv < 0;
        mag = neg ? 0ULL - (unsigned long long)sv : (unsigned long long)sv;
    }
    else if (overflow > 0) {
        mag = PyLong_AsUnsignedLongLong(v);
        if (mag == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 1;
        }
    }
    else
        return 1;
    char tmp[32];
    char *e = tmp + sizeof(tmp), *d = e;
    static const char digits[] = "0123456789abcdef";
    do {
        *--d = digits[mag % (unsigned)base];
        mag /= (unsigned)base;
    } while (mag);
    if (neg)
        *--d = '-';
    return out_put(o, d, (size_t)(e - d));
}

typedef struct {
    PyObject *state;
    PyObject *pre;    /* bytes: prefix + "/" */
    Py_ssize_t prefix_len;
    int pre_nul;      /* the prefix holds a NUL: escaping cuts there, leave it to Python */
    PyObject *times;  /* dict: seconds -> text */
    int escaping;     /* btrfs-progs >= 6.9.1's dump: xattrs, clones and encoded writes
                         are rendered by Python (dumper._escaping) */
} DumpState;

static PyObject *s_path, *s_path_to, *s_path_link, *s_target, *s_name, *s_data, *s_offset,
    *s_length, *s_clone_path, *s_clone_offset, *s_size, *s_mode, *s_rdev, *s_uid, *s_gid,
    *s_atime, *s_mtime, *s_ctime, *s_fileattr, *s_unencoded_file_len, *s_unencoded_len,
    *s_unencoded_offset, *s_compression, *s_encryption, *s_algorithm, *s_block_size,
    *s_salt, *s_sig, *s__pre, *s_prefix, *s__times, *s__time, *s__render_py,
    *s__escaping;

static int
dump_state_load(DumpState *ds)
{
    PyObject *pre = PyObject_GetAttr(ds->state, s__pre);
    if (pre == NULL)
        return -1;
    PyObject *prefix = PyObject_GetAttr(ds->state, s_prefix);
    if (prefix == NULL) {
        Py_DECREF(pre);
        return -1;
    }
    if (!PyBytes_CheckExact(pre) || !PyBytes_CheckExact(prefix)) {
        Py_DECREF(pre);
        Py_DECREF(prefix);
        PyErr_SetString(PyExc_TypeError, "dumper prefix must be bytes");
        return -1;
    }
    Py_XSETREF(ds->pre, pre);
    ds->pre_nul = memchr(PyBytes_AS_STRING(pre), 0, (size_t)PyBytes_GET_SIZE(pre)) != NULL;
    ds->prefix_len = PyBytes_GET_SIZE(prefix);
    Py_DECREF(prefix);
    return 0;
}

/* progs path_cat_out(prefix, path) into o (raw); 1 when Python must handle it */
static int
out_full(Out *o, DumpState *ds, PyObject *path)
{
    if (!PyBytes_CheckExact(path))
        return 1;
    const char *s = PyBytes_AS_STRING(path);
    size_t n = (size_t)PyBytes_GET_SIZE(path);
    const char *nul = memchr(s, 0, n);
    if (nul)
        n = (size_t)(nul - s);
    if ((size_t)ds->prefix_len + n + 2 >= 4096)
        return 1; /* Python raises "path invalid" */
    if (n && s[n - 1] == '/')
        n--;
    if (out_put(o, PyBytes_AS_STRING(ds->pre), (size_t)PyBytes_GET_SIZE(ds->pre)) < 0)
        return -1;
    return out_put(o, s, n);
}

/* text of a timestamp via the dumper's cache (or its _time); 1 to let Python do it */
static int
out_time(Out *o, DumpState *ds, PyObject *ns)
{
    if (!PyLong_CheckExact(ns))
        return 1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(ns, &overflow);
    if (overflow)
        return 1;
    if (v == -1 && PyErr_Occurred())
        return -1;
    long long sec = v / 1000000000LL;
    if (v % 1000000000LL < 0)
        sec -= 1; /* floor division, as Python's // */
    PyObject *key = PyLong_FromLongLong(sec);
    if (key == NULL)
        return -1;
    PyObject *text = PyDict_GetItemWithError(ds->times, key); /* borrowed */
    Py_DECREF(key);
    if (text == NULL && PyErr_Occurred())
        return -1;
    if (text != NULL && PyUnicode_Check(text) && PyUnicode_GET_LENGTH(text) > 0) {
        Py_INCREF(text);
    }
    else {
        text = PyObject_CallMethodOneArg(ds->state, s__time, ns);
        if (text == NULL)
            return -1;
    }
    int rc = 1;
    if (PyUnicode_Check(text) && PyUnicode_IS_READY(text) &&
        PyUnicode_KIND(text) == PyUnicode_1BYTE_KIND)
        rc = out_put(o, (const char *)PyUnicode_1BYTE_DATA(text),
                     (size_t)PyUnicode_GET_LENGTH(text));
    Py_DECREF(text);
    return rc;
}

/* ---- per-command argument renderers: 0 ok, 1 let Python render the record, -1 error ---- */

#define GET(var, name)                                                                    \
    PyObject *var = PyObject_GetAttr(rec, name);                                          \
    if (var == NULL) {                                                                    \
        rc = 1;                                                                           \
        PyErr_Clear();                                                                    \
        goto out;                                                                         \
    }
#define CHK(expr)                                                                         \
    if ((rc = (expr)) != 0)                                                               \
    goto out

static int
arg_ints(Out *o, PyObject *rec, const char *const *labels, PyObject *const *names,
         const int *bases, int n)
{
    int rc = 0;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyObject_GetAttr(rec, names[i]);
        if (v == NULL) {
            PyErr_Clear();
            return 1;
        }
        rc = out_put(o, labels[i], strlen(labels[i]));
        if (rc == 0)
            rc = out_int(o, v, bases[i]);
        Py_DECREF(v);
        if (rc)
            return rc;
    }
    return 0;
}

static int
arg_len(Out *o, PyObject *rec, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(rec, name);
    if (v == NULL) {
        PyErr_Clear();
        return 1;
    }
    Py_ssize_t n = PyObject_Length(v);
    Py_DECREF(v);
    if (n < 0) {
        PyErr_Clear();
        return 1;
    }
    char tmp[32];
    int k = snprintf(tmp, sizeof(tmp), "%zd", n);
    return out_put(o, tmp, (size_t)k);
}

/* "dest=" + escaped bytes attribute */
static int
arg_dest_escaped(Out *o, PyObject *rec, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(rec, name);
    if (v == NULL) {
        PyErr_Clear();
        return 1;
    }
    int rc = 1;
    if (PyBytes_CheckExact(v)) {
        rc = OUT_LIT(o, "dest=");
        if (rc == 0 && out_escaped(o, (const uint8_t *)PyBytes_AS_STRING(v),
                                   (size_t)PyBytes_GET_SIZE(v)) < 0)
            rc = -1;
    }
    Py_DECREF(v);
    return rc;
}

static const char *const titles[C_LAST] = {
    [C_MKFILE] = "mkfile", [C_MKDIR] = "mkdir", [C_MKNOD] = "mknod", [C_MKFIFO] = "mkfifo",
    [C_MKSOCK] = "mksock", [C_SYMLINK] = "symlink", [C_RENAME] = "rename", [C_LINK] = "link",
    [C_UNLINK] = "unlink", [C_RMDIR] = "rmdir", [C_SET_XATTR] = "set_xattr",
    [C_REMOVE_XATTR] = "remove_xattr", [C_WRITE] = "write", [C_CLONE] = "clone",
    [C_TRUNCATE] = "truncate", [C_CHMOD] = "chmod", [C_CHOWN] = "chown",
    [C_UTIMES] = "utimes", [C_UPDATE_EXTENT] = "update_extent",
    [C_FALLOCATE] = "fallocate", [C_FILEATTR] = "fileattr",
    [C_ENCODED_WRITE] = "encoded_write", [C_ENABLE_VERITY] = "enable_verity",
};

/* the arguments after the path column; *none set when the command prints none */
static int
render_args(Out *o, DumpState *ds, PyObject *rec, int c)
{
    int rc = 0;
    switch (c) {
    case C_MKNOD: {
        static const char *const l[] = {"mode=", " dev=0x"};
        PyObject *const n[] = {s_mode, s_rdev};
        static const int b[] = {8, 16};
        return arg_ints(o, rec, l, n, b, 2);
    }
    case C_SYMLINK:
        return arg_dest_escaped(o, rec, s_target);
    case C_LINK:
        return arg_dest_escaped(o, rec, s_path_link);
    case C_RENAME: {
        GET(to, s_path_to);
        Out tmp = {NULL, 0, 0};
        rc = out_full(&tmp, ds, to);
        if (rc == 0) {
            rc = OUT_LIT(o, "dest=");
            if (rc == 0 && out_escaped(o, (const uint8_t *)tmp.buf, tmp.len) < 0)
                rc = -1;
        }
        PyMem_Free(tmp.buf);
        Py_DECREF(to);
        return rc;
    }
    case C_SET_XATTR:
    case C_REMOVE_XATTR: {
        GET(name, s_name);
        if (!PyBytes_CheckExact(name)) {
            Py_DECREF(name);
            return 1;
        }
        rc = OUT_LIT(o, "name=");
        if (rc == 0)
            rc = out_cstr(o, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
        Py_DECREF(name);
        if (rc || c == C_REMOVE_XATTR)
            return rc;
        GET(data, s_data);
        if (!PyBytes_CheckExact(data)) {
            Py_DECREF(data);
            return 1;
        }
        char tmp[40];
        int k = snprintf(tmp, sizeof(tmp), " len=%zd", PyBytes_GET_SIZE(data));
        rc = OUT_LIT(o, " data=");
        if (rc == 0)
            rc = out_cstr(o, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
        if (rc == 0)
            rc = out_put(o, tmp, (size_t)k);
        Py_DECREF(data);
        return rc;
    }
    case C_WRITE: {
        static const char *const l[] = {"offset="};
        PyObject *const n[] = {s_offset};
        static const int b[] = {10};
        CHK(arg_ints(o, rec, l, n, b, 1));
        CHK(OUT_LIT(o, " len="));
        return arg_len(o, rec, s_data);
    }
    case C_CLONE: {
        static const char *const l[] = {"offset=", " len="};
        PyObject *const n[] = {s_offset, s_length};
        static const int b[] = {10, 10};
        CHK(arg_ints(o, rec, l, n, b, 2));
        CHK(OUT_LIT(o, " from="));
        GET(src, s_clone_path);
        rc = out_full(o, ds, src);
        Py_DECREF(src);
        if (rc)
            return rc;
        static const char *const l2[] = {" clone_offset="};
        PyObject *const n2[] = {s_clone_offset};
        return arg_ints(o, rec, l2, n2, b, 1);
    }
    case C_TRUNCATE: {
        static const char *const l[] = {"size="};
        PyObject *const n[] = {s_size};
        static const int b[] = {10};
        return arg_ints(o, rec, l, n, b, 1);
    }
    case C_CHMOD: {
        static const char *const l[] = {"mode="};
        PyObject *const n[] = {s_mode};
        static const int b[] = {8};
        return arg_ints(o, rec, l, n, b, 1);
    }
    case C_CHOWN: {
        static const char *const l[] = {"gid=", " uid="};
        PyObject *const n[] = {s_gid, s_uid};
        static const int b[] = {10, 10};
        return arg_ints(o, rec, l, n, b, 2);
    }
    case C_UTIMES: {
        static const char *const l[] = {"atime=", " mtime=", " ctime="};
        PyObject *const n[] = {s_atime, s_mtime, s_ctime};
        for (int i = 0; i < 3; i++) {
            CHK(out_put(o, l[i], strlen(l[i])));
            GET(t, n[i]);
            rc = out_time(o, ds, t);
            Py_DECREF(t);
            if (rc)
                return rc;
        }
        return 0;
    }
    case C_UPDATE_EXTENT: {
        static const char *const l[] = {"offset=", " len="};
        PyObject *const n[] = {s_offset, s_size};
        static const int b[] = {10, 10};
        return arg_ints(o, rec, l, n, b, 2);
    }
    case C_FALLOCATE: {
        static const char *const l[] = {"mode=", " offset=", " len="};
        PyObject *const n[] = {s_mode, s_offset, s_size};
        static const int b[] = {10, 10, 10};
        return arg_ints(o, rec, l, n, b, 3);
    }
    case C_FILEATTR: {
        static const char *const l[] = {"fileattr=0x"};
        PyObject *const n[] = {s_fileattr};
        static const int b[] = {10};
        return arg_ints(o, rec, l, n, b, 1);
    }
    case C_ENCODED_WRITE: {
        static const char *const l[] = {"offset="};
        PyObject *const n[] = {s_offset};
        static const int b[] = {10, 10, 10, 10};
        CHK(arg_ints(o, rec, l, n, b, 1));
        CHK(OUT_LIT(o, " len="));
        CHK(arg_len(o, rec, s_data));
        static const char *const l2[] = {", unencoded_file_len=", ", unencoded_len=",
                                         ", unencoded_offset=", ", compression="};
        PyObject *const n2[] = {s_unencoded_file_len, s_unencoded_len, s_unencoded_offset,
                                s_compression};
        CHK(arg_ints(o, rec, l2, n2, b, 4));
        CHK(OUT_LIT(o, ", encryption="));
        GET(enc, s_encryption);
        if (enc == Py_None)
            rc = OUT_LIT(o, "0");
        else
            rc = out_int(o, enc, 10);
        Py_DECREF(enc);
        return rc;
    }
    case C_ENABLE_VERITY: {
        static const char *const l[] = {"algorithm=", " block_size="};
        PyObject *const n[] = {s_algorithm, s_block_size};
        static const int b[] = {10, 10};
        CHK(arg_ints(o, rec, l, n, b, 2));
        CHK(OUT_LIT(o, " salt_len="));
        CHK(arg_len(o, rec, s_salt));
        CHK(OUT_LIT(o, " sig_len="));
        return arg_len(o, rec, s_sig);
    }
    default:
        return 1;
    }
out:
    return rc;
}

static const char spaces[33] = "                                ";

/* one record; 0 done, 1 let Python render it, -1 error */
static int
render_one(Out *o, DumpState *ds, PyObject *rec, int c)
{
    int rc;
    const char *title = titles[c];
    if (title == NULL || ds->pre_nul)
        return 1;
    if (ds->escaping && (c == C_SET_XATTR || c == C_REMOVE_XATTR || c == C_CLONE ||
                         c == C_ENCODED_WRITE))
        return 1;
    PyObject *path = PyObject_GetAttr(rec, s_path);
    if (path == NULL) {
        PyErr_Clear();
        return 1;
    }
    if (!PyBytes_CheckExact(path)) {
        Py_DECREF(path);
        return 1;
    }
    const char *ps = PyBytes_AS_STRING(path);
    Py_ssize_t pn = PyBytes_GET_SIZE(path);
    /* the TextDumper's fast case only; the rest goes through its _full() */
    if ((pn && ps[pn - 1] == '/') || memchr(ps, 0, (size_t)pn) || pn > 2000) {
        Py_DECREF(path);
        return 1;
    }
    size_t tl = strlen(title);
    rc = out_put(o, title, tl);
    if (rc == 0)
        rc = out_put(o, spaces, 16 - tl);
    Py_ssize_t shown = 0;
    if (rc == 0) {
        /* prefix and path escaped as one string: prefix bytes are escaped the same way */
        Py_ssize_t a = out_escaped(o, (const uint8_t *)PyBytes_AS_STRING(ds->pre),
                                   (size_t)PyBytes_GET_SIZE(ds->pre));
        Py_ssize_t b = a < 0 ? -1 : out_escaped(o, (const uint8_t *)ps, (size_t)pn);
        if (a < 0 || b < 0)
            rc = -1;
        shown = a + b;
    }
    Py_DECREF(path);
    if (rc)
        return rc;
    switch (c) {
    case C_MKFILE:
    case C_MKDIR:
    case C_MKFIFO:
    case C_MKSOCK:
    case C_UNLINK:
    case C_RMDIR:
        return OUT_LIT(o, "\n");
    default:
        break;
    }
    Py_ssize_t pad = 32 - shown;
    rc = pad > 1 ? out_put(o, spaces, (size_t)pad) : OUT_LIT(o, " ");
    if (rc == 0)
        rc = render_args(o, ds, rec, c);
    if (rc == 0)
        rc = OUT_LIT(o, "\n");
    return rc;
}

static int
render_fallback(Out *o, DumpState *ds, PyObject *rec)
{
    PyObject *one = PyTuple_Pack(1, rec);
    if (one == NULL)
        return -1;
    PyObject *text = PyObject_CallMethodOneArg(ds->state, s__render_py, one);
    Py_DECREF(one);
    if (text == NULL)
        return -1;
    PyObject *raw = PyUnicode_AsLatin1String(text);
    Py_DECREF(text);
    if (raw == NULL)
        return -1;
    int rc = out_put(o, PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    if (rc == 0)
        rc = dump_state_load(ds); /* subvol/snapshot change the prefix */
    return rc;
}

PyDoc_STRVAR(render_dump_doc,
"render_dump(records, dumper, /) -> str\n\n"
"TextDumper.render in C: the `btrfs receive --dump` lines of records. Records it does not\n"
"render itself go through dumper._render_py((record,)).");

static PyObject *
render_dump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "render_dump takes 2 arguments");
        return NULL;
    }
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() has not been called");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "records must be iterable");
    if (seq == NULL)
        return NULL;
    DumpState ds = {args[1], NULL, 0, 0, NULL, 0};
    Out o = {NULL, 0, 0};
    PyObject *result = NULL;
    if (dump_state_load(&ds) < 0)
        goto finish;
    ds.times = PyObject_GetAttr(ds.state, s__times);
    if (ds.times == NULL)
        goto finish;
    PyObject *escaping = PyObject_GetAttr(ds.state, s__escaping);
    if (escaping == NULL)
        goto finish;
    ds.escaping = PyObject_IsTrue(escaping);
    Py_DECREF(escaping);
    if (ds.escaping < 0)
        goto finish;
    if (!PyDict_Check(ds.times)) {
        PyErr_SetString(PyExc_TypeError, "dumper._times must be a dict");
        goto finish;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        /* the list may change under us if a fallback runs user code: re-check the size */
        if (i >= PySequence_Fast_GET_SIZE(seq))
            break;
        PyObject *rec = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(rec);
        PyTypeObject *tp = Py_TYPE(rec);
        int c = 0;
        for (int k = 1; k < C_LAST && k < NCMD; k++) {
            if ((PyObject *)tp == cmds[k].cls) {
                c = k;
                break;
            }
        }
        int rc;
        if (c == C_END)
            rc = 0;
        else if (c == 0 || c == C_SUBVOL || c == C_SNAPSHOT)
            rc = 1;
        else {
            size_t mark = o.len;
            rc = render_one(&o, &ds, rec, c);
            if (rc == 1)
                o.len = mark;
        }
        if (rc == 1)
            rc = render_fallback(&o, &ds, rec);
        Py_DECREF(rec);
        if (rc < 0)
            goto finish;
    }
    result = PyUnicode_DecodeLatin1(o.buf ? o.buf : "", (Py_ssize_t)o.len, NULL);
finish:
    PyMem_Free(o.buf);
    Py_XDECREF(ds.pre);
    Py_XDECREF(ds.times);
    Py_DECREF(seq);
    return result;
}


/* ---------------------------------------------------------------------------------------
 * encoding (the writer's hot path)
 *
 * encode_head(rec, version) does what codec.encode_record does for the plain cases and
 * returns (header + attributes as one bytes, the v2+ DATA piece or None); it returns None
 * (no exception) for anything else (a value of an unusual type, out of range, too long, a
 * command the version lacks, a payload over the limit, no hardware CRC for large data), so
 * that encode_record, the reference, produces the bytes or the precise error. */

static PyObject *s_bytes_attr;

static int last_enc_cmd = -1;

static int
enc_cmd_of(PyTypeObject *tp)
{
    if (last_enc_cmd >= 0 && cmds[last_enc_cmd].cls == (PyObject *)tp)
        return last_enc_cmd;
    for (int c = 1; c < NCMD; c++)
        if (cmds[c].cls == (PyObject *)tp) {
            last_enc_cmd = c;
            return c;
        }
    return -1;
}

typedef struct {
    const FieldPlan *f;
    PyObject *obj;      /* new reference: the field value, or the UUID's bytes */
    const uint8_t *raw; /* BYTES/UUID/v1 DATA: the bytes */
    uint64_t num;       /* U8/U32/U64 value; TIMESPEC: seconds (two's complement) */
    uint32_t nsec;
    size_t len;         /* value bytes in the TLV */
    int skip;           /* optional and None */
} EncField;

static PyObject *
encode_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_head(rec, version)");
        return NULL;
    }
    long version = PyLong_AsLong(args[1]);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    if (!configured || version < 1 || version >= NVERSIONS)
        Py_RETURN_NONE;
    int c = enc_cmd_of(Py_TYPE(args[0]));
    if (c < 0 || (uint32_t)c > max_cmd[version] || cmds[c].names == NULL)
        Py_RETURN_NONE;
    const CmdPlan *cp = &cmds[c];
    EncField ef[MAXF];
    int n = cp->nplan[1];
    PyObject *data = NULL; /* the v2+ DATA piece (borrowed from ef) */
    Py_buffer dview;
    int have_dview = 0;
    size_t attrs = 0, dlen = 0;
    PyObject *res = NULL, *head = NULL;
    int i;
    memset(ef, 0, sizeof(ef));
    for (i = 0; i < n; i++) {
        EncField *e = &ef[i];
        e->f = &cp->plan[1][i];
        e->obj = PyObject_GetAttr(args[0], PyTuple_GET_ITEM(cp->names, e->f->pos));
        if (e->obj == NULL)
            goto fallback;
        if (e->obj == Py_None) {
            if (!e->f->optional)
                goto fallback;
            e->skip = 1;
            continue;
        }
        switch (e->f->kind) {
        case K_U8:
        case K_U32:
        case K_U64: {
            if (!PyLong_Check(e->obj))
                goto fallback;
            unsigned long long v = PyLong_AsUnsignedLongLong(e->obj);
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                goto fallback;
            if ((e->f->kind == K_U8 && v > 0xFF) || (e->f->kind == K_U32 && v > 0xFFFFFFFFull))
                goto fallback;
            e->num = v;
            e->len = fixed_size[e->f->kind];
            break;
        }
        case K_TIMESPEC: {
            if (!PyLong_Check(e->obj))
                goto fallback;
            int overflow = 0;
            long long ns = PyLong_AsLongLongAndOverflow(e->obj, &overflow);
            if (overflow || (ns == -1 && PyErr_Occurred()))
                goto fallback;
            long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
            if (rem < 0) { /* floor division, as divmod */
                rem += 1000000000LL;
                sec -= 1;
            }
            e->num = (uint64_t)sec;
            e->nsec = (uint32_t)rem;
            e->len = 12;
            break;
        }
        case K_UUID: {
            PyObject *b = PyObject_GetAttr(e->obj, s_bytes_attr);
            if (b == NULL)
                goto fallback;
            Py_SETREF(e->obj, b);
            if (!PyBytes_CheckExact(b))
                goto fallback;
            e->raw = (const uint8_t *)PyBytes_AS_STRING(b);
            e->len = (size_t)PyBytes_GET_SIZE(b);
            break;
        }
        case K_BYTES:
            if (!PyBytes_Check(e->obj))
                goto fallback;
            e->raw = (const uint8_t *)PyBytes_AS_STRING(e->obj);
            e->len = (size_t)PyBytes_GET_SIZE(e->obj);
            break;
        case K_DATA:
            if (data != NULL)
                goto fallback;
            if (PyBytes_Check(e->obj)) {
                e->raw = (const uint8_t *)PyBytes_AS_STRING(e->obj);
                e->len = (size_t)PyBytes_GET_SIZE(e->obj);
            } else if (PyMemoryView_Check(e->obj)) {
                /* a plain byte view only (returned as the DATA piece, as it is) */
                if (PyObject_GetBuffer(e->obj, &dview, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
                    goto fallback;
                have_dview = 1;
                if (dview.ndim > 1 || dview.itemsize != 1 ||
                    (dview.format != NULL && strcmp(dview.format, "B")))
                    goto fallback;
                e->raw = (const uint8_t *)dview.buf;
                e->len = (size_t)dview.len;
            } else
                goto fallback;
            data = e->obj;
            dlen = e->len;
            if (version >= 2) {
                attrs += 2; /* the type only: the data is the rest of the command */
                continue;
            }
            break;
        default:
            goto fallback;
        }
        if (e->len > 0xFFFF)
            goto fallback;
        attrs += 4 + e->len;
    }
    size_t length = attrs + (version >= 2 ? dlen : 0);
    if (length > max_payload[version])
        goto fallback;
    if (version >= 2 && dlen >= LIB_CRC_MIN && !crc_is_hw())
        goto fallback; /* the library's CRC is the fast one here */
    head = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(CMD_HEADER_SIZE + attrs));
    if (head == NULL)
        goto error;
    uint8_t *h = (uint8_t *)PyBytes_AS_STRING(head), *p = h + CMD_HEADER_SIZE;
    put_le32(h, (uint32_t)length);
    h[4] = (uint8_t)c;
    h[5] = (uint8_t)(c >> 8);
    memset(h + 6, 0, 4);
    for (i = 0; i < n; i++) {
        EncField *e = &ef[i];
        if (e->skip)
            continue;
        uint16_t attr = e->f->attr;
        p[0] = (uint8_t)attr;
        p[1] = (uint8_t)(attr >> 8);
        if (e->f->kind == K_DATA && version >= 2) {
            p += 2;
            continue;
        }
        p[2] = (uint8_t)e->len;
        p[3] = (uint8_t)(e->len >> 8);
        p += 4;
        switch (e->f->kind) {
        case K_U8:
            p[0] = (uint8_t)e->num;
            break;
        case K_U32:
            put_le32(p, (uint32_t)e->num);
            break;
        case K_U64:
            put_le64(p, e->num);
            break;
        case K_TIMESPEC:
            put_le64(p, e->num);
            put_le32(p + 8, e->nsec);
            break;
        default:
            if (e->len)
                memcpy(p, e->raw, e->len);
        }
        p += e->len;
    }
    uint32_t crc = crc_update(0, h, CMD_HEADER_SIZE + attrs);
    PyObject *piece = Py_None;
    if (data != NULL && version >= 2) {
        const uint8_t *raw = NULL;
        for (i = 0; i < n; i++)
            if (ef[i].obj == data)
                raw = ef[i].raw;
        /* with the GIL held: the CRC of 1 MiB takes ~70 us here, and a send's other
         * threads (the walk, the hashing threads) took the GIL as soon as it was released,
         * for up to the switch interval (5 ms): Debian /usr's 622 records of 64 KiB or
         * more waited 40-90 ms in all for it, against 4-5 ms of CRC */
        if (dlen)
            crc = crc_update(crc, raw, dlen);
        piece = data;
    }
    put_le32(h + 6, crc);
    res = PyTuple_Pack(2, head, piece);
    goto done;
fallback:
    PyErr_Clear();
    res = Py_None;
    Py_INCREF(res);
    goto done;
error:
    res = NULL;
done:
    Py_XDECREF(head);
    if (have_dview)
        PyBuffer_Release(&dview);
    for (i = 0; i < n; i++)
        Py_XDECREF(ef[i].obj);
    return res;
}

PyDoc_STRVAR(encode_head_doc,
"encode_head(rec, version, /) -> (head, data) | None\n\n"
"codec.encode_record(rec, version) for the plain cases: the command header and its\n"
"attributes as one bytes, and the DATA piece of a v2+ command (the record's own object)\n"
"or None; None when the Python encoder must do it (unusual values, errors).");

/* ---------------------------------------------------------------------------------------
 * encode_inode: all of a created inode's records at once (a full send's hot path) */

/* the values of one inode's records, by attribute */
typedef struct {
    const uint8_t *path;
    size_t plen;
    uint64_t ino, uid, gid, mode;
    int64_t sec[4]; /* atime, mtime, ctime, otime (as the record fields: ns floored) */
    uint32_t nsec[4];
    int otime;      /* a v2+ stream: OTIME is sent (the ctime) */
    size_t dlen;    /* WRITE: the data's length */
} InodeVals;

/* Serialize command c of `version` from `v` at p (NULL: only measure). The attributes are
 * the command's encoding plan (the record's fields in order), each value taken by its
 * attribute number; a field this encoder has no value for, or of a kind not expected for
 * it, makes it return 0 (the Python encoder must do it). Returns the bytes of the header
 * and attributes (a v2+ WRITE's data not counted: it follows them), or 0. */
static size_t
put_inode_cmd(uint8_t *p, int c, long version, const InodeVals *v)
{
    const CmdPlan *cp = &cmds[c];
    size_t at = CMD_HEADER_SIZE;
    if (cp->cls == NULL || (uint32_t)c > max_cmd[version])
        return 0;
    for (int i = 0; i < cp->nplan[1]; i++) {
        const FieldPlan *f = &cp->plan[1][i];
        uint64_t num = 0;
        int ts = -1;
        size_t len;
        switch (f->attr) {
        case A_PATH:
            if (f->kind != K_BYTES || v->plen > 0xFFFF)
                return 0;
            len = v->plen;
            break;
        case A_INO: num = v->ino; goto number;
        case A_UID: num = v->uid; goto number;
        case A_GID: num = v->gid; goto number;
        case A_MODE: num = v->mode; goto number;
        case A_FILE_OFFSET: num = 0; goto number;
        case A_ATIME: ts = 0; goto times;
        case A_MTIME: ts = 1; goto times;
        case A_CTIME: ts = 2; goto times;
        case A_OTIME:
            if (!v->otime) {
                if (!f->optional)
                    return 0;
                continue;
            }
            ts = 3;
            goto times;
        case A_DATA:
            if (f->kind != K_DATA || i != cp->nplan[1] - 1)
                return 0; /* (the data is the command's last piece) */
            if (version >= 2) {
                if (p != NULL) {
                    p[at] = (uint8_t)f->attr;
                    p[at + 1] = (uint8_t)(f->attr >> 8);
                }
                at += 2;
                continue;
            }
            if (v->dlen > 0xFFFF)
                return 0;
            if (p != NULL) {
                p[at] = (uint8_t)f->attr;
                p[at + 1] = (uint8_t)(f->attr >> 8);
                p[at + 2] = (uint8_t)v->dlen;
                p[at + 3] = (uint8_t)(v->dlen >> 8);
            }
            at += 4; /* the data itself follows (not in p) */
            continue;
        default:
            return 0;
        }
        goto put;
    number:
        if (f->kind != K_U64)
            return 0;
        len = 8;
        goto put;
    times:
        if (f->kind != K_TIMESPEC)
            return 0;
        len = 12;
    put:
        if (p != NULL) {
            uint8_t *q = p + at;
            q[0] = (uint8_t)f->attr;
            q[1] = (uint8_t)(f->attr >> 8);
            q[2] = (uint8_t)len;
            q[3] = (uint8_t)(len >> 8);
            q += 4;
            if (f->attr == A_PATH) {
                if (len)
                    memcpy(q, v->path, len);
            } else if (ts >= 0) {
                put_le64(q, (uint64_t)v->sec[ts]);
                put_le32(q + 8, v->nsec[ts]);
            } else
                put_le64(q, num);
        }
        at += 4 + len;
    }
    size_t length = at - CMD_HEADER_SIZE + (c == C_WRITE ? v->dlen : 0);
    if (length > max_payload[version])
        return 0;
    if (p != NULL) {
        put_le32(p, (uint32_t)length);
        p[4] = (uint8_t)c;
        p[5] = (uint8_t)(c >> 8);
        memset(p + 6, 0, 4);
        if (c != C_WRITE) /* (a WRITE's CRC covers its data too: the caller's) */
            put_le32(p + 6, crc_update(0, p, at));
    }
    return at;
}

static int
ns_of(PyObject *o, int64_t *sec, uint32_t *nsec)
{
    int overflow = 0;
    long long ns = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : -1;
    if (!PyLong_Check(o) || overflow || (ns == -1 && PyErr_Occurred()))
        return -1;
    long long s = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) { /* floor division, as divmod */
        rem += 1000000000LL;
        s -= 1;
    }
    *sec = s;
    *nsec = (uint32_t)rem;
    return 0;
}

static int
u64_of(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static PyObject *
encode_inode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_inode(version, path, ino, content, uid, gid, "
                                         "mode, atime, mtime, ctime)");
        return NULL;
    }
    long version = PyLong_AsLong(args[0]);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    InodeVals v;
    memset(&v, 0, sizeof(v));
    PyObject *content = args[3];
    long long ino = PyLong_Check(args[2]) ? PyLong_AsLongLong(args[2]) : -2;
    if (ino == -1 && PyErr_Occurred())
        goto fallback;
    if (!configured || version < 1 || version >= NVERSIONS || !PyBytes_CheckExact(args[1]) ||
        ino < -1 || (content != Py_None && !PyBytes_CheckExact(content)) ||
        u64_of(args[4], &v.uid) || u64_of(args[5], &v.gid) || u64_of(args[6], &v.mode))
        goto fallback;
    for (int t = 0; t < 3; t++)
        if (ns_of(args[7 + t], &v.sec[t], &v.nsec[t]))
            goto fallback;
    v.path = (const uint8_t *)PyBytes_AS_STRING(args[1]);
    v.plen = (size_t)PyBytes_GET_SIZE(args[1]);
    v.ino = (uint64_t)ino;
    v.otime = version >= 2;
    v.sec[3] = v.sec[2];
    v.nsec[3] = v.nsec[2];
    const uint8_t *data = NULL;
    if (content != Py_None && PyBytes_GET_SIZE(content) > 0) {
        data = (const uint8_t *)PyBytes_AS_STRING(content);
        v.dlen = (size_t)PyBytes_GET_SIZE(content);
        if (version >= 2 && v.dlen >= LIB_CRC_MIN && !crc_is_hw())
            goto fallback; /* the library's CRC is the fast one here */
    }
    int chmod = (v.mode & 0170000) != 0120000; /* (never for a symlink) */
    v.mode &= 07777;
    /* the records before the data (MKFILE?, WRITE's head) and after it (CHOWN, CHMOD?,
     * UTIMES), measured, then written */
    int before[2], after[3], nb = 0, na = 0;
    if (ino >= 0)
        before[nb++] = C_MKFILE;
    if (data != NULL)
        before[nb++] = C_WRITE;
    after[na++] = C_CHOWN;
    if (chmod)
        after[na++] = C_CHMOD;
    after[na++] = C_UTIMES;
    size_t hlen = 0, tlen = 0, got;
    for (int i = 0; i < nb; i++) {
        if ((got = put_inode_cmd(NULL, before[i], version, &v)) == 0)
            goto fallback;
        hlen += got;
    }
    for (int i = 0; i < na; i++) {
        if ((got = put_inode_cmd(NULL, after[i], version, &v)) == 0)
            goto fallback;
        tlen += got;
    }
    /* without data, everything is one piece */
    PyObject *head = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(hlen + (data ? 0 : tlen)));
    PyObject *tail = data ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)tlen) : NULL;
    if (head == NULL || (data && tail == NULL)) {
        Py_XDECREF(head);
        Py_XDECREF(tail);
        return NULL;
    }
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(head);
    for (int i = 0; i < nb; i++) {
        got = put_inode_cmd(p, before[i], version, &v);
        if (before[i] == C_WRITE)
            put_le32(p + 6, crc_update(crc_update(0, p, got), data, v.dlen));
        p += got;
    }
    if (data)
        p = (uint8_t *)PyBytes_AS_STRING(tail);
    for (int i = 0; i < na; i++)
        p += put_inode_cmd(p, after[i], version, &v);
    PyObject *res = Py_BuildValue("(NONi)", head, data ? content : Py_None,
                                  data ? tail : PyBytes_FromStringAndSize(NULL, 0), nb + na);
    return res;
fallback:
    PyErr_Clear();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(encode_inode_doc,
"encode_inode(version, path, ino, content, uid, gid, mode, atime, mtime, ctime, /)\n"
"    -> (head, data, tail, records) | None\n\n"
"A created inode's records, encoded as codec.encode_record encodes the records a full\n"
"send makes of it, in its order: MKFILE (ino >= 0; -1: none), one WRITE of content at\n"
"offset 0 (bytes; None or empty: none), CHOWN, CHMOD (mode & 07777; not for a symlink),\n"
"UTIMES (times in ns; OTIME = ctime in v2+). head: the bytes up to the WRITE's data (all\n"
"of them without data); data: content as it is, or None; tail: the bytes after it;\n"
"records: how many. None when the Python encoder must do it (unusual values).");

/* a bytearray of n bytes, not zeroed (a buffer that a read fills at once: the zeroing of
 * bytearray(n) was a pass over every byte of a replication's messages) */
static PyObject *
py_buffer(PyObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

/* ---------------------------------------------------------------------------------------
 * CRC entry points (for tests and for the curious) */

/* force_sw: the table path; std: the usual convention (register inverted in and out) */
static PyObject *
crc_common(PyObject *args, int force_sw, int std)
{
    Py_buffer data;
    unsigned long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|k", &data, &seed))
        return NULL;
    uint32_t crc = (uint32_t)seed;
    if (std)
        crc = ~crc;
    if (force_sw)
        crc = crc_sw(crc, data.buf, (size_t)data.len);
    else
        crc = crc_update(crc, data.buf, (size_t)data.len);
    if (std)
        crc = ~crc;
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *
py_crc32c(PyObject *self, PyObject *args)
{
    return crc_common(args, 0, 0);
}

static PyObject *
py_crc32c_std(PyObject *self, PyObject *args)
{
    return crc_common(args, 0, 1);
}

static PyObject *
py_crc32c_table(PyObject *self, PyObject *args)
{
    return crc_common(args, 1, 0);
}

/* tests: run the table path (and the library for large data) on a machine with SSE4.2 */
static PyObject *
py_set_crc_impl(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL || (strcmp(name, "table") && strcmp(name, "sse4.2"))) {
        PyErr_SetString(PyExc_ValueError, "crc implementation: 'table' or 'sse4.2'");
        return NULL;
    }
    PyObject *prev = PyUnicode_FromString(crc_is_hw() ? "sse4.2" : "table");
#ifdef HAVE_X86_CRC
    if (!strcmp(name, "sse4.2") && !__builtin_cpu_supports("sse4.2")) {
        Py_XDECREF(prev);
        PyErr_SetString(PyExc_ValueError, "this CPU has no SSE4.2");
        return NULL;
    }
    have_hw_crc = !strcmp(name, "sse4.2");
#else
    if (!strcmp(name, "sse4.2")) {
        Py_XDECREF(prev);
        PyErr_SetString(PyExc_ValueError, "built without SSE4.2 support");
        return NULL;
    }
#endif
    return prev;
}

/* mallopt(param, value) -> bool: glibc's setting taken (False off glibc). For
 * btrdelta._malloc: importing ctypes to call it costs a short command ~1.4 ms of CPU. */
static PyObject *
py_mallopt(PyObject *self, PyObject *args)
{
    int param, value;
    (void)self;
    if (!PyArg_ParseTuple(args, "ii:mallopt", &param, &value))
        return NULL;
#if defined(__GLIBC__)
    return PyBool_FromLong(mallopt(param, value) == 1);
#else
    (void)param;
    (void)value;
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"mallopt", py_mallopt, METH_VARARGS,
     "mallopt(param, value, /) -> bool: glibc's mallopt (False where there is none)."},
    {"configure", configure, METH_VARARGS,
     "configure(uuid_cls, commands, limits, end_cmd, crc32c=None, /): set the decoding plan."},
    {"decode_batch", (PyCFunction)(void (*)(void))decode_batch, METH_FASTCALL,
     decode_batch_doc},
    {"render_dump", (PyCFunction)(void (*)(void))render_dump, METH_FASTCALL, render_dump_doc},
    {"encode_head", (PyCFunction)(void (*)(void))encode_head, METH_FASTCALL, encode_head_doc},
    {"encode_inode", (PyCFunction)(void (*)(void))encode_inode, METH_FASTCALL,
     encode_inode_doc},
    {"buffer", py_buffer, METH_O,
     "buffer(n, /) -> bytearray: n bytes, not zeroed (for a read that fills them)."},
    {"_set_crc_impl", py_set_crc_impl, METH_O,
     "_set_crc_impl(name, /) -> previous: 'sse4.2' or 'table' (for tests)."},
    {"crc32c", py_crc32c, METH_VARARGS,
     "crc32c(data, crc=0, /): btrfs CRC32C (raw register) with the fastest implementation."},
    {"crc32c_std", py_crc32c_std, METH_VARARGS,
     "crc32c_std(data, value=0, /): CRC-32C in the usual convention (like the crc32c "
     "package: value is a finished CRC to continue)."},
    {"crc32c_table", py_crc32c_table, METH_VARARGS,
     "crc32c_table(data, crc=0, /): btrfs CRC32C with the slicing-by-8 table."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "Optional C accelerator for btrdelta.stream (decode batch, dump rendering, CRC32C).", -1,
    methods,
};

static int
intern_names(void)
{
#define I(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                 \
    return -1
    I(s_path, "path");
    I(s_path_to, "path_to");
    I(s_path_link, "path_link");
    I(s_target, "target");
    I(s_name, "name");
    I(s_data, "data");
    I(s_offset, "offset");
    I(s_length, "length");
    I(s_clone_path, "clone_path");
    I(s_clone_offset, "clone_offset");
    I(s_size, "size");
    I(s_mode, "mode");
    I(s_rdev, "rdev");
    I(s_uid, "uid");
    I(s_gid, "gid");
    I(s_atime, "atime");
    I(s_mtime, "mtime");
    I(s_ctime, "ctime");
    I(s_fileattr, "fileattr");
    I(s_unencoded_file_len, "unencoded_file_len");
    I(s_unencoded_len, "unencoded_len");
    I(s_unencoded_offset, "unencoded_offset");
    I(s_compression, "compression");
    I(s_encryption, "encryption");
    I(s_algorithm, "algorithm");
    I(s_block_size, "block_size");
    I(s_salt, "salt");
    I(s_sig, "sig");
    I(s__pre, "_pre");
    I(s_prefix, "prefix");
    I(s__times, "_times");
    I(s__time, "_time");
    I(s__render_py, "_render_py");
    I(s__escaping, "_escaping");
    I(s_bytes_attr, "bytes");
#undef I
    return 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    crc_init();
    esc_init();
    if (intern_names() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_X86_CRC
    const char *impl = have_hw_crc ? "sse4.2" : "table";
#else
    const char *impl = "table";
#endif
    /* render_dump reads dumper._escaping (btrfs-progs >= 6.9.1's dump format) */
    if (PyModule_AddIntConstant(m, "DUMP_ESCAPING", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "CRC_IMPL", impl) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t len): CRC32C without
     * inversions (btrfs's command CRC is crc_update(0, header + payload)) */
    PyObject *cap = PyCapsule_New((void *)crc_update_ext,
                                  "btrdelta.stream._speedups._crc_update", NULL);
    if (cap == NULL || PyModule_AddObject(m, "_crc_update", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

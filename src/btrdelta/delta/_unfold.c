/*
 * btrdelta.delta._unfold: the common carried commands of a format-4..9 delta stream unfolded
 * in C (see carrier.py for the carrier form).
 *
 * Strategy: carrier.unfold() in Python stays the reference and the only place with error
 * messages. run() unfolds carried commands one after the other into the caller's group
 * (a bytearray of whole btrfs commands, CRCs set) and stops *before* the first command it
 * does not handle, or that is malformed in any way, with nothing of that command applied to
 * the state: Python then unfolds that one (and raises its located error), and calls run()
 * again. Handled here: the PATH forms "previous path" (0xffff), orphan name (0xfffe), in
 * format 8 orphan name with an implied inode number (0xfffa: the INO TLV is put back),
 * literal PATH and an UNLINK's reference into the old directory listing (0xfffb), times
 * folded as differences (0xfffd) in UTIMES, a RENAME's PATH_TO as a reference to an
 * unlinked name (0xfffc), and commands stored as they are; the name commands (UNLINK,
 * RENAME, MKDIR, RMDIR) update CarrierState's name model as carrier.unfold does. Left to
 * Python: SUBVOL/SNAPSHOT (a new old root), a RENAME without PATH_TO, and every delta
 * record; format 9's names from the old listings (0xfff9) are resolved here too (old_name:
 * the listings asked of CarrierState._listing(), every index checked).
 *
 * The state shared with Python: CarrierState.last_path, .last_ino and .times are read at
 * the start of a run and written back at its end; the name model (names, name_at,
 * name_pos, rename_dir, unlink_dir, unlink_pos, moves) is read and written on the state
 * object itself, command by command, and its listings and path map are asked through
 * CarrierState._listing() and PathMap.rename/create/remove, Python's own code: what a
 * name command changes is worked out (and it stops there on anything unusual) before the
 * command goes out, and applied after.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* generated: btrfs commands and attributes (stream/constants.py), CMD_HEADER_SIZE, the
 * carrier markers SAME_PATH, ORPHAN, TIMES (carrier.py) */
#include "_constants.h"
#define NS 1000000000ull
#define MAX_WIDTH 13

typedef unsigned __int128 u128;
typedef __int128 i128;

/* the BTRFS CRC32C of a buffer (seed 0, no final inversion), from stream._speedups */
typedef uint32_t (*crc_fn)(uint32_t, const uint8_t *, size_t);
static crc_fn crc_update;

static PyObject *s_last_path, *s_last_ino, *s_times, *billion;

static inline uint16_t
le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void
put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void
put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void
put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static int
time_slot(unsigned t)
{
    switch (t) {
    case A_CTIME:
        return 0;
    case A_MTIME:
        return 1;
    case A_ATIME:
        return 2;
    case A_OTIME:
        return 3;
    default:
        return -1;
    }
}

static const unsigned slot_attr[4] = {A_CTIME, A_MTIME, A_ATIME, A_OTIME};

/* the folded times of the state: present[], value in ns; -1 on a value this cannot hold */
typedef struct {
    int loaded;
    int present[4];
    int changed[4];
    u128 ns[4];
} Times;

static int
times_load(Times *tm, PyObject *state)
{
    PyObject *d = PyObject_GetAttr(state, s_times);
    if (d == NULL)
        return -1;
    int ret = -1;
    if (!PyDict_Check(d))
        goto out;
    for (int i = 0; i < 4; i++) {
        PyObject *key = PyLong_FromLong(slot_attr[i]);
        if (key == NULL)
            goto out;
        PyObject *v = PyDict_GetItemWithError(d, key);
        Py_DECREF(key);
        tm->present[i] = v != NULL;
        tm->ns[i] = 0;
        if (v == NULL) {
            if (PyErr_Occurred())
                goto out;
            continue;
        }
        PyObject *qr = PyNumber_Divmod(v, billion);
        if (qr == NULL)
            goto out;
        unsigned long long sec = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(qr, 0));
        unsigned long long nsec = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(qr, 1));
        Py_DECREF(qr);
        if (PyErr_Occurred())
            goto out;
        tm->ns[i] = (u128)sec * NS + nsec;
    }
    tm->loaded = 1;
    ret = 0;
out:
    Py_DECREF(d);
    return ret;
}

static int
times_store(const Times *tm, PyObject *state)
{
    PyObject *d = PyObject_GetAttr(state, s_times);
    if (d == NULL)
        return -1;
    int ret = 0;
    for (int i = 0; i < 4 && ret == 0; i++) {
        if (!tm->changed[i])
            continue;
        ret = -1;
        PyObject *sec = PyLong_FromUnsignedLongLong((unsigned long long)(tm->ns[i] / NS));
        PyObject *nsec = PyLong_FromUnsignedLongLong((unsigned long long)(tm->ns[i] % NS));
        PyObject *key = PyLong_FromLong(slot_attr[i]);
        PyObject *mul = sec ? PyNumber_Multiply(sec, billion) : NULL;
        PyObject *val = mul && nsec ? PyNumber_Add(mul, nsec) : NULL;
        if (val != NULL && key != NULL)
            ret = PyDict_SetItem(d, key, val);
        Py_XDECREF(sec);
        Py_XDECREF(nsec);
        Py_XDECREF(key);
        Py_XDECREF(mul);
        Py_XDECREF(val);
    }
    Py_DECREF(d);
    return ret;
}

/* a growable byte buffer */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} Buf;

static int
buf_reserve(Buf *b, size_t n)
{
    if (n <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < n)
        cap *= 2;
    uint8_t *p = PyMem_Realloc(b->p, cap);
    if (p == NULL)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int
buf_set(Buf *b, const uint8_t *p, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return -1;
    memmove(b->p, p, n);
    b->n = n;
    return 0;
}

/* append n bytes of room to the bytearray `out`; its new tail, or NULL */
static uint8_t *
grow(PyObject *out, size_t n)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, old + (Py_ssize_t)n) < 0)
        return NULL;
    return (uint8_t *)PyByteArray_AS_STRING(out) + old;
}

/* the UTIMES times TLV value v[0:n] unfolded into `tail` (12-byte timespec TLVs), the
 * times in `tmp` advanced; -1 if anything is off (Python then reports it) */
static int
unfold_times(const uint8_t *v, size_t n, Times *tmp, Buf *tail)
{
    static const i128 max_ns = (i128)(((u128)1 << 64) * NS - 1);
    size_t pos = 0;
    tail->n = 0;
    while (pos < n) {
        if (n - pos < 3)
            return -1;
        unsigned t = le16(v + pos);
        unsigned w = v[pos + 2];
        pos += 3;
        int slot = time_slot(t);
        if (slot < 0 || w < 1 || w > MAX_WIDTH || pos + w > n)
            return -1;
        u128 raw = 0;
        for (unsigned i = 0; i < w; i++)
            raw |= (u128)v[pos + i] << (8 * i);
        if (v[pos + w - 1] & 0x80)
            raw |= ~(u128)0 << (8 * w); /* sign extension, w <= 13 */
        pos += w;
        i128 ns = (i128)tmp->ns[slot] + (i128)raw;
        if (ns < 0 || ns > max_ns)
            return -1;
        tmp->ns[slot] = (u128)ns;
        tmp->present[slot] = 1;
        tmp->changed[slot] = 1;
        if (buf_reserve(tail, tail->n + 16) < 0)
            return -1;
        uint8_t *o = tail->p + tail->n;
        put16(o, (uint16_t)t);
        put16(o + 2, 12);
        put64(o + 4, (uint64_t)((u128)ns / NS));
        put32(o + 12, (uint32_t)((u128)ns % NS));
        tail->n += 16;
    }
    return 0;
}

static int
is_create(unsigned cmd)
{
    return cmd == C_MKFILE || cmd == C_MKDIR || cmd == C_MKNOD || cmd == C_MKFIFO ||
           cmd == C_MKSOCK || cmd == C_SYMLINK;
}

/* ---- the name commands: CarrierState's name model (carrier.py), on its own objects ---- */

static PyObject *s_unlink_dir, *s_unlink_pos, *s_names, *s_name_at, *s_name_pos,
    *s_rename_dir, *s_moves, *s_pathmap, *s_listing, *s_rename, *s_create, *s_remove;

/* a name reference's value v[0:n]: one LEB128 value spanning it exactly, of at most 63
 * bits, zigzag-decoded into *out; -1 for anything else (Python decides then) */
static int
zigzag(const uint8_t *v, size_t n, long long *out)
{
    uint64_t z = 0;
    if (n == 0 || n > 9)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!(v[i] & 0x80) != (i == n - 1))
            return -1;
        z |= (uint64_t)(v[i] & 0x7F) << (7 * i);
    }
    *out = z & 1 ? -(long long)((z >> 1) + 1) : (long long)(z >> 1);
    return 0;
}

/* an int attribute of the state; -1 (error set) if it is none */
static int
get_ll(PyObject *state, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(state, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int
set_ll(PyObject *state, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int ret = PyObject_SetAttr(state, name, v);
    Py_DECREF(v);
    return ret;
}

/* state._listing(d) (the sorted names of the old directory d stands for, and their
 * index): 0 with a new reference to the pair in *got, 1 if there is none, -1 on anything
 * else (any error cleared: Python asks again and raises it) */
static int
listing(PyObject *state, PyObject *d, PyObject **got)
{
    PyObject *r = PyObject_CallMethodOneArg(state, s_listing, d);
    if (r == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (r == Py_None) {
        Py_DECREF(r);
        return 1;
    }
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 2 || !PyList_Check(PyTuple_GET_ITEM(r, 0)) ||
        !PyDict_Check(PyTuple_GET_ITEM(r, 1))) {
        Py_DECREF(r);
        return -1;
    }
    *got = r;
    return 0;
}

/* the last '/' of p[0:n], or -1 */
static Py_ssize_t
last_slash(const uint8_t *p, size_t n)
{
    for (size_t i = n; i > 0; i--)
        if (p[i - 1] == '/')
            return (Py_ssize_t)(i - 1);
    return -1;
}

/* state.unlinked(path): the base name of an UNLINK appended to names and name_at */
static int
unlinked(PyObject *state, const uint8_t *path, size_t n)
{
    Py_ssize_t cut = last_slash(path, n);
    PyObject *name = PyBytes_FromStringAndSize((const char *)path + cut + 1,
                                               (Py_ssize_t)n - cut - 1);
    PyObject *names = PyObject_GetAttr(state, s_names);
    PyObject *name_at = PyObject_GetAttr(state, s_name_at);
    PyObject *idx = NULL;
    int ret = -1;
    if (name == NULL || names == NULL || name_at == NULL)
        goto out;
    if (!PyList_Check(names) || !PyDict_Check(name_at)) {
        PyErr_SetString(PyExc_TypeError, "CarrierState.names / name_at");
        goto out;
    }
    idx = PyLong_FromSsize_t(PyList_GET_SIZE(names));
    PyObject *at = idx ? PyDict_GetItemWithError(name_at, name) : NULL;
    if (idx == NULL || (at == NULL && PyErr_Occurred()))
        goto out;
    if (at == NULL) {
        PyObject *fresh = PyList_New(0);
        if (fresh == NULL || PyDict_SetItem(name_at, name, fresh) < 0) {
            Py_XDECREF(fresh);
            goto out;
        }
        at = fresh;
        Py_DECREF(fresh); /* the dict holds it */
    }
    if (!PyList_Check(at)) {
        PyErr_SetString(PyExc_TypeError, "CarrierState.name_at");
        goto out;
    }
    if (PyList_Append(at, idx) < 0 || PyList_Append(names, name) < 0)
        goto out;
    ret = 0;
out:
    Py_XDECREF(name);
    Py_XDECREF(names);
    Py_XDECREF(name_at);
    Py_XDECREF(idx);
    return ret;
}

/* _follow(): a directory command followed in state.pathmap (ValueError: the subvolume
 * root as a name, nothing to follow); b may be NULL */
static int
follow(PyObject *state, PyObject *method, PyObject *a, PyObject *b)
{
    long long moves;
    if (get_ll(state, s_moves, &moves) < 0 || set_ll(state, s_moves, moves + 1) < 0)
        return -1;
    PyObject *pm = PyObject_GetAttr(state, s_pathmap);
    if (pm == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodObjArgs(pm, method, a, b, NULL);
    Py_DECREF(pm);
    if (r == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(r);
    return 0;
}

/* a LEB128 value at v[*pos:n] of at most 10 bytes (read_uvarint) that fits in 64 bits,
 * *pos moved past it; -1 for anything else (Python decides then) */
static int
uvarint(const uint8_t *v, size_t n, size_t *pos, uint64_t *out)
{
    uint64_t x = 0;
    for (size_t i = *pos, s = 0; i < n && i < *pos + 10; i++, s += 7) {
        if (s == 63 && (v[i] & 0x7E))
            return -1;
        x |= (uint64_t)(v[i] & 0x7F) << s;
        if (!(v[i] & 0x80)) {
            *out = x;
            *pos = i + 1;
            return 0;
        }
    }
    return -1;
}

/* bytes a[0:an] against the bytes object b, as Python orders them */
static int
bytes_cmp(const uint8_t *a, size_t an, PyObject *b)
{
    size_t bn = (size_t)PyBytes_GET_SIZE(b);
    int c = memcmp(a, PyBytes_AS_STRING(b), an < bn ? an : bn);
    return c ? c : (an > bn) - (an < bn);
}

/* format 9: resolve_old_name(), the PATH an OLDNAME TLV of value v[0:n] stands for, into
 * *path from the previous path last[0:ln]; the listings are CarrierState._listing()'s (a
 * list of bytes each, indexed here: every index checked against its length). 0, or -1
 * (error cleared) for anything Python's unfold is left to resolve or refuse, with the
 * same message as ever */
static int
old_name(PyObject *state, const uint8_t *last, size_t ln, const uint8_t *v, size_t n,
         Buf *path)
{
    size_t pos = 0;
    uint64_t up, z;
    if (uvarint(v, n, &pos, &up) < 0 || up > OLDNAME_UP || pos == n)
        return -1;
    size_t an = ln;
    for (uint64_t i = 0; i < up; i++) {
        Py_ssize_t c = last_slash(last, an);
        if (c < 0)
            return -1;
        an = (size_t)c;
    }
    Py_ssize_t c = last_slash(last, an);
    size_t dn = c < 0 ? 0 : (size_t)c;
    const uint8_t *aname = c < 0 ? last : last + c + 1;
    size_t aname_n = an - (c < 0 ? 0 : (size_t)c + 1);
    if (buf_set(path, last, dn) < 0)
        return -1;
    int first = 1;
    for (int i = 0; i < OLDNAME_DOWN && pos < n; i++) {
        if (uvarint(v, n, &pos, &z) < 0)
            return -1;
        PyObject *d = PyBytes_FromStringAndSize((const char *)path->p, (Py_ssize_t)path->n);
        PyObject *got = NULL;
        int r = d ? listing(state, d, &got) : -1;
        Py_XDECREF(d);
        if (r != 0) {
            PyErr_Clear();
            return -1;
        }
        PyObject *names = PyTuple_GET_ITEM(got, 0);
        Py_ssize_t len = PyList_GET_SIZE(names), k;
        if (first) {
            /* bisect_left(names, aname) + 1 + unzigzag(z) */
            Py_ssize_t lo = 0, hi = len;
            while (lo < hi) {
                Py_ssize_t mid = lo + (hi - lo) / 2;
                PyObject *nm = PyList_GET_ITEM(names, mid);
                if (!PyBytes_Check(nm)) {
                    Py_DECREF(got);
                    return -1;
                }
                if (bytes_cmp(aname, aname_n, nm) > 0)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (z > (uint64_t)PY_SSIZE_T_MAX) {
                Py_DECREF(got);
                return -1;
            }
            Py_ssize_t half = (Py_ssize_t)(z >> 1);
            k = z & 1 ? lo - half : lo + 1 + half; /* -(half + 1) + lo + 1 */
            first = 0;
        }
        else
            k = z > (uint64_t)PY_SSIZE_T_MAX ? -1 : (Py_ssize_t)z;
        if (k < 0 || k >= len || !PyBytes_Check(PyList_GET_ITEM(names, k))) {
            Py_DECREF(got);
            return -1;
        }
        PyObject *nm = PyList_GET_ITEM(names, k);
        size_t nn = (size_t)PyBytes_GET_SIZE(nm);
        if (buf_reserve(path, path->n + 1 + nn) < 0) {
            Py_DECREF(got);
            return -1;
        }
        if (path->n)
            path->p[path->n++] = '/';
        memcpy(path->p + path->n, PyBytes_AS_STRING(nm), nn);
        path->n += nn;
        Py_DECREF(got);
    }
    return pos == n ? 0 : -1;
}

static PyObject *
run(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    Py_ssize_t start, limit, max_out, max_count = PY_SSIZE_T_MAX;
    PyObject *out, *state;
    int fmt, max_cmd;
    if (!PyArg_ParseTuple(args, "y*nO!Oinin|n:run", &raw, &start, &PyByteArray_Type, &out,
                          &state, &fmt, &limit, &max_cmd, &max_out, &max_count))
        return NULL;
    const uint8_t *b = raw.buf;
    size_t len = (size_t)raw.len;
    size_t p = start < 0 ? len : (size_t)start;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    Buf last = {0}, path = {0}, tail = {0};
    int have_last = 0, last_changed = 0, ino_changed = 0;
    /* a name command's effects, computed before it goes out, committed after: new
       references (NULL: none), dropped at the end of every command */
    PyObject *path_obj = NULL, *to_obj = NULL, *new_dir = NULL, *got = NULL, *ud = NULL;
    /* the inode number of the last creation with an orphan name (format 8: the next one
       may be implied) */
    unsigned long long last_ino = 0;
    Times times = {0}, tmp;

    PyObject *lp = PyObject_GetAttr(state, s_last_path);
    if (lp == NULL)
        goto done;
    if (PyBytes_Check(lp)) {
        have_last = 1;
        if (buf_set(&last, (const uint8_t *)PyBytes_AS_STRING(lp),
                    (size_t)PyBytes_GET_SIZE(lp)) < 0) {
            Py_DECREF(lp);
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_DECREF(lp);
    PyObject *li = PyObject_GetAttr(state, s_last_ino);
    if (li == NULL)
        goto done;
    last_ino = PyLong_AsUnsignedLongLong(li);
    Py_DECREF(li);
    if (PyErr_Occurred())
        goto done;

    /* stops once the group holds max_out bytes (bounded memory whatever the unfolding
       multiplies: a 4-byte "previous path" can stand for 64 KiB) or max_count commands
       were unfolded: the caller hands it on (the receiver starts on the first ones) */
    while (p + CMD_HEADER_SIZE <= len && PyByteArray_GET_SIZE(out) < max_out &&
           count < max_count) {
        uint32_t length = le32(b + p);
        unsigned cmd = le16(b + p + 4);
        size_t end = p + CMD_HEADER_SIZE + (size_t)length;
        if (cmd == 0 || (int)cmd > max_cmd || (Py_ssize_t)length > limit || end > len ||
            le32(b + p + 6) != 0)
            break;
        if (cmd == C_SUBVOL || cmd == C_SNAPSHOT)
            break;
        Py_CLEAR(path_obj);
        Py_CLEAR(to_obj);
        Py_CLEAR(new_dir);
        Py_CLEAR(got);
        Py_CLEAR(ud);
        size_t q = p + CMD_HEADER_SIZE, rest = 0;
        int as_is = 0, has_path = 1, times_tail = 0, has_ino = 0, implied_ino = 0;
        /* RENAME: its PATH_TO (to_obj) unfolded into `tail` from a name reference;
           name_pos / unlink_pos to set (and rename_dir / unlink_dir: new_dir) */
        int ref_tail = 0, set_pos = 0;
        long long new_pos = 0;
        unsigned long long ino = 0;
        unsigned t = 0;
        if (end - q < 4) {
            as_is = 1;
            has_path = 0;
        }
        else {
            t = le16(b + q);
            unsigned n = le16(b + q + 2);
            if (t == SAME_PATH && n == 0) {
                if (!have_last)
                    break;
                rest = q + 4;
                if (buf_set(&path, last.p, last.n) < 0)
                    break;
            }
            else if (t == ORPHAN) {
                rest = q + 4 + n;
                if (!is_create(cmd) || rest + 12 > end || le16(b + rest) != A_INO ||
                    le16(b + rest + 2) != 8)
                    break;
                for (int i = 7; i >= 0; i--)
                    ino = ino << 8 | b[rest + 4 + i];
                has_ino = 1;
                char head[32];
                int hn = snprintf(head, sizeof head, "o%llu-", (unsigned long long)ino);
                if (buf_reserve(&path, (size_t)hn + n) < 0)
                    break;
                memcpy(path.p, head, (size_t)hn);
                memcpy(path.p + hn, b + q + 4, n);
                path.n = (size_t)hn + n;
            }
            else if (t == NEXT_INO) {
                /* format 8: o<previous inode + 1>-<rest>, its INO TLV left out */
                rest = q + 4 + n;
                if (fmt < 8 || !is_create(cmd) || rest > end || last_ino == UINT64_MAX)
                    break;
                ino = last_ino + 1;
                has_ino = implied_ino = 1;
                char head[32];
                int hn = snprintf(head, sizeof head, "o%llu-", ino);
                if (buf_reserve(&path, (size_t)hn + n) < 0)
                    break;
                memcpy(path.p, head, (size_t)hn);
                memcpy(path.p + hn, b + q + 4, n);
                path.n = (size_t)hn + n;
            }
            else if (t == A_PATH) {
                rest = q + 4 + n;
                if (rest > end || buf_set(&path, b + q + 4, n) < 0)
                    break;
            }
            else if (t == OLDREF && cmd == C_UNLINK) {
                /* resolve_unlink(): the next name in the old listing of the directory of
                   the last UNLINK, by a zigzag difference of indexes */
                rest = q + 4 + n;
                long long d, pos;
                if (rest > end || zigzag(b + q + 4, n, &d) < 0)
                    break;
                ud = PyObject_GetAttr(state, s_unlink_dir);
                if (ud == NULL || !PyBytes_Check(ud) || get_ll(state, s_unlink_pos, &pos) < 0 ||
                    listing(state, ud, &got) != 0) {
                    PyErr_Clear();
                    break;
                }
                PyObject *names = PyTuple_GET_ITEM(got, 0);
                long long k = pos + 1 + d;
                if (k < 0 || k >= PyList_GET_SIZE(names) ||
                    !PyBytes_Check(PyList_GET_ITEM(names, k)))
                    break;
                PyObject *nm = PyList_GET_ITEM(names, k);
                size_t dn = (size_t)PyBytes_GET_SIZE(ud), nn = (size_t)PyBytes_GET_SIZE(nm);
                if (buf_reserve(&path, dn + 1 + nn) < 0)
                    break;
                memcpy(path.p, PyBytes_AS_STRING(ud), dn);
                path.n = dn;
                if (dn)
                    path.p[path.n++] = '/';
                memcpy(path.p + path.n, PyBytes_AS_STRING(nm), nn);
                path.n += nn;
                set_pos = 1;
                new_pos = k;
            }
            else if (t == OLDNAME && fmt >= 9) {
                /* format 9: a name of an old listing near the previous path (old_name);
                   anything it does not resolve is left to Python's unfold */
                rest = q + 4 + n;
                if (rest > end || !have_last ||
                    old_name(state, last.p, last.n, b + q + 4, n, &path) < 0)
                    break;
            }
            else {
                as_is = 1;
                has_path = 0;
            }
        }
        if (has_path && cmd == C_UTIMES && end - rest >= 4 && le16(b + rest) == TIMES) {
            size_t k = le16(b + rest + 2);
            if (rest + 4 + k != end)
                break;
            if (!times.loaded && times_load(&times, state) < 0) {
                PyErr_Clear();
                break;
            }
            tmp = times;
            if (unfold_times(b + rest + 4, k, &tmp, &tail) < 0)
                break;
            times_tail = 1;
        }
        if (has_path && (cmd == C_UNLINK || cmd == C_RENAME || cmd == C_MKDIR || cmd == C_RMDIR)) {
            path_obj = PyBytes_FromStringAndSize((const char *)path.p, (Py_ssize_t)path.n);
            if (path_obj == NULL) {
                PyErr_Clear();
                break;
            }
        }
        if (has_path && cmd == C_UNLINK && t != OLDREF) {
            /* unlink_ref(): a new directory starts over; in the same one, the name's
               index in the old listing (if it has one) */
            Py_ssize_t cut = last_slash(path.p, path.n);
            size_t dn = cut < 0 ? 0 : (size_t)cut;
            ud = PyObject_GetAttr(state, s_unlink_dir);
            if (ud == NULL) {
                PyErr_Clear();
                break;
            }
            if (!PyBytes_Check(ud) || (size_t)PyBytes_GET_SIZE(ud) != dn ||
                memcmp(PyBytes_AS_STRING(ud), path.p, dn) != 0) {
                new_dir = PyBytes_FromStringAndSize((const char *)path.p, (Py_ssize_t)dn);
                if (new_dir == NULL) {
                    PyErr_Clear();
                    break;
                }
                set_pos = 1;
                new_pos = -1;
            }
            else {
                int rc = listing(state, ud, &got);
                if (rc < 0)
                    break;
                if (rc == 0) {
                    PyObject *nm = PyBytes_FromStringAndSize(
                        (const char *)path.p + cut + 1, (Py_ssize_t)(path.n - (size_t)cut - 1));
                    PyObject *k = nm ? PyDict_GetItemWithError(PyTuple_GET_ITEM(got, 1), nm)
                                     : NULL;
                    Py_XDECREF(nm);
                    if (k != NULL) {
                        new_pos = PyLong_AsLongLong(k);
                        set_pos = 1;
                    }
                    if (PyErr_Occurred()) {
                        PyErr_Clear();
                        break;
                    }
                }
            }
        }
        else if (has_path && cmd == C_RENAME) {
            if (end - rest >= 4 && le16(b + rest) == NAMEREF) {
                /* resolve_ref(): PATH_TO is the directory of the last RENAME's and a name
                   unlinked before, by a zigzag difference of indexes */
                size_t k = le16(b + rest + 2);
                long long d, pos;
                if (rest + 4 + k > end || zigzag(b + rest + 4, k, &d) < 0)
                    break;
                PyObject *rd = PyObject_GetAttr(state, s_rename_dir);
                PyObject *names = rd ? PyObject_GetAttr(state, s_names) : NULL;
                int ok = names != NULL && PyBytes_Check(rd) && PyList_Check(names) &&
                         get_ll(state, s_name_pos, &pos) == 0;
                long long i = ok ? pos + 1 + d : -1;
                ok = ok && i >= 0 && i < PyList_GET_SIZE(names) &&
                     PyBytes_Check(PyList_GET_ITEM(names, i));
                if (ok) {
                    to_obj = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(rd) +
                                                      PyBytes_GET_SIZE(PyList_GET_ITEM(names, i)));
                    if (to_obj != NULL) {
                        memcpy(PyBytes_AS_STRING(to_obj), PyBytes_AS_STRING(rd),
                               (size_t)PyBytes_GET_SIZE(rd));
                        memcpy(PyBytes_AS_STRING(to_obj) + PyBytes_GET_SIZE(rd),
                               PyBytes_AS_STRING(PyList_GET_ITEM(names, i)),
                               (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(names, i)));
                    }
                }
                Py_XDECREF(rd);
                Py_XDECREF(names);
                if (!ok || to_obj == NULL) {
                    PyErr_Clear();
                    break;
                }
                size_t tn = (size_t)PyBytes_GET_SIZE(to_obj), more = end - (rest + 4 + k);
                if (tn > 0xFFFF || buf_reserve(&tail, 4 + tn + more) < 0)
                    break;
                put16(tail.p, A_PATH_TO);
                put16(tail.p + 2, (uint16_t)tn);
                memcpy(tail.p + 4, PyBytes_AS_STRING(to_obj), tn);
                memcpy(tail.p + 4 + tn, b + rest + 4 + k, more);
                tail.n = 4 + tn + more;
                ref_tail = 1;
                set_pos = 1;
                new_pos = i;
            }
            else {
                /* PATH_TO as it is; name_ref(): in the directory of the last RENAME's,
                   the occurrence of its name among the unlinked names nearest to the
                   next one */
                if (end - rest < 4 || le16(b + rest) != A_PATH_TO)
                    break; /* no PATH_TO: Python's */
                size_t m = le16(b + rest + 2);
                if (rest + 4 + m > end)
                    break;
                const uint8_t *to = b + rest + 4;
                Py_ssize_t cut = last_slash(to, m) + 1;
                to_obj = PyBytes_FromStringAndSize((const char *)to, (Py_ssize_t)m);
                new_dir = PyBytes_FromStringAndSize((const char *)to, cut);
                PyObject *rd = new_dir ? PyObject_GetAttr(state, s_rename_dir) : NULL;
                if (to_obj == NULL || rd == NULL) {
                    Py_XDECREF(rd);
                    PyErr_Clear();
                    break;
                }
                int same_dir = PyBytes_Check(rd) && PyBytes_GET_SIZE(rd) == cut &&
                               memcmp(PyBytes_AS_STRING(rd), to, (size_t)cut) == 0;
                Py_DECREF(rd);
                if (same_dir) {
                    PyObject *nm = PyBytes_FromStringAndSize((const char *)to + cut,
                                                             (Py_ssize_t)m - cut);
                    PyObject *name_at = nm ? PyObject_GetAttr(state, s_name_at) : NULL;
                    PyObject *at = name_at && PyDict_Check(name_at)
                                       ? PyDict_GetItemWithError(name_at, nm) : NULL;
                    long long pos;
                    int bad = name_at == NULL || !PyDict_Check(name_at) || PyErr_Occurred() ||
                              (at != NULL && !PyList_Check(at));
                    if (!bad && at != NULL && PyList_GET_SIZE(at) > 0) {
                        bad = get_ll(state, s_name_pos, &pos) < 0;
                        long long want = pos + 1, best = 0;
                        unsigned long long dist = ~0ull;
                        for (Py_ssize_t j = 0; !bad && j < PyList_GET_SIZE(at); j++) {
                            long long v = PyLong_AsLongLong(PyList_GET_ITEM(at, j));
                            if (v == -1 && PyErr_Occurred()) {
                                bad = 1;
                                break;
                            }
                            unsigned long long dv = v >= want ? (unsigned long long)(v - want)
                                                              : (unsigned long long)(want - v);
                            if (dv < dist) { /* min(): the first of the nearest */
                                dist = dv;
                                best = v;
                            }
                        }
                        set_pos = 1;
                        new_pos = best;
                    }
                    Py_XDECREF(nm);
                    Py_XDECREF(name_at);
                    if (bad || nm == NULL) {
                        PyErr_Clear();
                        break;
                    }
                }
            }
        }
        if (has_path && t == A_PATH && !times_tail && !ref_tail)
            as_is = 1;
        size_t taillen = times_tail || ref_tail ? tail.n : end - rest;
        size_t inolen = implied_ino ? 12 : 0;
        size_t newlen = as_is ? length : 4 + path.n + inolen + taillen;
        if (!as_is && (path.n > 0xFFFF || newlen > (size_t)limit))
            break;
        uint8_t *o = grow(out, CMD_HEADER_SIZE + newlen);
        if (o == NULL) {
            PyErr_Clear();
            break;
        }
        if (as_is) {
            memcpy(o, b + p, CMD_HEADER_SIZE + length);
        }
        else {
            put32(o, (uint32_t)newlen);
            put16(o + 4, (uint16_t)cmd);
            put32(o + 6, 0);
            put16(o + 10, A_PATH);
            put16(o + 12, (uint16_t)path.n);
            memcpy(o + 14, path.p, path.n);
            if (implied_ino) {
                put16(o + 14 + path.n, A_INO);
                put16(o + 16 + path.n, 8);
                put64(o + 18 + path.n, (uint64_t)ino);
            }
            memcpy(o + 14 + path.n + inolen, times_tail || ref_tail ? tail.p : b + rest,
                   taillen);
        }
        put32(o + 6, crc_update(0, o, CMD_HEADER_SIZE + newlen));
        /* the command is out: its effects on the state are committed */
        if (has_path) {
            /* RENAME: the previous path is its PATH_TO (cannot fail: the buffer fits) */
            int ren = cmd == C_RENAME;
            if (buf_set(&last, ren ? (const uint8_t *)PyBytes_AS_STRING(to_obj) : path.p,
                        ren ? (size_t)PyBytes_GET_SIZE(to_obj) : path.n) < 0) {
                PyErr_NoMemory();
                goto done;
            }
            have_last = 1;
            last_changed = 1;
        }
        if (has_path && cmd == C_UNLINK) {
            if ((new_dir != NULL && PyObject_SetAttr(state, s_unlink_dir, new_dir) < 0) ||
                (set_pos && set_ll(state, s_unlink_pos, new_pos) < 0) ||
                unlinked(state, path.p, path.n) < 0)
                goto done;
        }
        else if (has_path && cmd == C_RENAME) {
            if ((new_dir != NULL && PyObject_SetAttr(state, s_rename_dir, new_dir) < 0) ||
                (set_pos && set_ll(state, s_name_pos, new_pos) < 0) ||
                follow(state, s_rename, path_obj, to_obj) < 0)
                goto done;
        }
        else if (has_path && (cmd == C_MKDIR || cmd == C_RMDIR)) {
            if (follow(state, cmd == C_MKDIR ? s_create : s_remove, path_obj, NULL) < 0)
                goto done;
        }
        if (times_tail)
            times = tmp;
        if (has_ino) {
            last_ino = ino;
            ino_changed = 1;
        }
        count++;
        p = end;
    }
    if (last_changed) {
        PyObject *v = PyBytes_FromStringAndSize((const char *)last.p, (Py_ssize_t)last.n);
        if (v == NULL || PyObject_SetAttr(state, s_last_path, v) < 0) {
            Py_XDECREF(v);
            goto done;
        }
        Py_DECREF(v);
    }
    if (times.loaded && times_store(&times, state) < 0)
        goto done;
    if (ino_changed) {
        PyObject *v = PyLong_FromUnsignedLongLong(last_ino);
        if (v == NULL || PyObject_SetAttr(state, s_last_ino, v) < 0) {
            Py_XDECREF(v);
            goto done;
        }
        Py_DECREF(v);
    }
    result = Py_BuildValue("nn", (Py_ssize_t)p, count);
done:
    Py_XDECREF(path_obj);
    Py_XDECREF(to_obj);
    Py_XDECREF(new_dir);
    Py_XDECREF(got);
    Py_XDECREF(ud);
    PyMem_Free(last.p);
    PyMem_Free(path.p);
    PyMem_Free(tail.p);
    PyBuffer_Release(&raw);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS,
     "run(raw, pos, group, state, fmt, limit, max_cmd, max_out, max_count=unlimited) -> "
     "(pos, count): unfold the carried commands of raw[pos:] into the bytearray group (CRCs "
     "set) up to the first one Python must unfold, until group holds max_out bytes or "
     "max_count commands were unfolded; state is the CarrierState "
     "(last_path, last_ino and times are read and updated); fmt: the delta's format version."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_unfold",
    "Optional C path of the delta carrier's unfolding (see _unfold.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__unfold(void)
{
    crc_update = (crc_fn)PyCapsule_Import("btrdelta.stream._speedups._crc_update", 0);
    if (crc_update == NULL)
        return NULL;
    if ((s_last_path = PyUnicode_InternFromString("last_path")) == NULL ||
        (s_times = PyUnicode_InternFromString("times")) == NULL ||
        (s_last_ino = PyUnicode_InternFromString("last_ino")) == NULL ||
        (billion = PyLong_FromUnsignedLongLong(NS)) == NULL)
        return NULL;
    static const struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_unlink_dir, "unlink_dir"}, {&s_unlink_pos, "unlink_pos"}, {&s_names, "names"},
        {&s_name_at, "name_at"}, {&s_name_pos, "name_pos"}, {&s_rename_dir, "rename_dir"},
        {&s_moves, "moves"}, {&s_pathmap, "pathmap"}, {&s_listing, "_listing"},
        {&s_rename, "rename"}, {&s_create, "create"}, {&s_remove, "remove"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    return PyModule_Create(&module);
}

/*
 * btrdelta.send._cells: the digest input of a file's cells from its extent items, in C.
 *
 * A record keeps the extent items of a file past its bound as cells (btrdelta.send.extents,
 * docs/formats/sendshot.md 3a): ranges of the file, each with a BLAKE3 digest of the data
 * ranges it maps, as maximal runs of one key (the same extent, at the same place) clipped to
 * it. extents.py makes that input in Python (_cell_sums_py: the reference, used when this
 * module is not built; ~1.3 us an item, 35 s for the 26 M items of a 100 GiB image in 4 KiB
 * extents); this module walks a whole batch of items in one call. The digest stays BLAKE3 of
 * the Python module, one call a cell.
 *
 * inputs(items, bounds, k, final) -> (data, ends, k_next, keep):
 *   items: packed extent items in file order, 50 bytes each (btrdelta.fs.btrfs.EXTENT:
 *   u64 offset, length, disk bytenr, disk length, offset in the extent, generation; u8
 *   type, compression; little-endian). bounds: the cells' edges, u64 each (cell j is
 *   [bounds[j], bounds[j + 1])). From cell k on, each cell the items complete (the last
 *   item ends at or past its end, or final: no item follows) gets in data
 *   "btrdelta-cells\0" and, per data range in it (items of disk bytenr 0 are holes: left
 *   out), u64 start, end, disk bytenr, disk length, generation, u8 type, compression, s64
 *   where the extent starts in the file (offset - offset in the extent); ends: the u64 end
 *   of each cell's input in data. k_next: the first cell not completed; keep: the index of
 *   the first item it needs (the caller keeps the items from there and adds the next
 *   batch). A cell depends only on the items that meet it (runs clipped to a range are
 *   the runs of the items clipped to it), so batches can be cut anywhere.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define ITEM 50
#define SPAN 50
static const char PREFIX[] = "btrdelta-cells"; /* and its NUL: 15 bytes */
#define PREFIX_LEN 15

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t item_end(const uint8_t *it) {
    uint64_t off = le64(it), num = le64(it + 8);
    return off + num < off ? UINT64_MAX : off + num;
}

typedef struct {
    uint64_t start, end, bytenr, disk, gen, base;
    uint8_t kind, comp;
} span_t;

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} out_t;

static int grow(out_t *o, size_t more) {
    if (o->len + more <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more)
        cap *= 2;
    uint8_t *b = PyMem_Realloc(o->buf, cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static int put_span(out_t *o, const span_t *s) {
    if (grow(o, SPAN) < 0)
        return -1;
    uint8_t *p = o->buf + o->len;
    put64(p, s->start);
    put64(p + 8, s->end);
    put64(p + 16, s->bytenr);
    put64(p + 24, s->disk);
    put64(p + 32, s->gen);
    p[40] = s->kind;
    p[41] = s->comp;
    put64(p + 42, s->base);
    o->len += SPAN;
    return 0;
}

static PyObject *inputs(PyObject *self, PyObject *args) {
    Py_buffer items, bounds;
    Py_ssize_t k;
    int final;
    if (!PyArg_ParseTuple(args, "y*y*np", &items, &bounds, &k, &final))
        return NULL;
    PyObject *result = NULL;
    out_t data = {0}, ends = {0};
    const uint8_t *it = items.buf, *bd = bounds.buf;
    Py_ssize_t n = items.len / ITEM, ncells = bounds.len / 8 - 1, i = 0;
    if (items.len % ITEM || bounds.len % 8 || k < 0) {
        PyErr_SetString(PyExc_ValueError, "items of 50 bytes, bounds of 8, k >= 0");
        goto done;
    }
    uint64_t last = n ? item_end(it + (n - 1) * ITEM) : 0;
    for (; k < ncells; k++) {
        uint64_t a = le64(bd + 8 * k), e = le64(bd + 8 * (k + 1));
        if (!final && last < e)
            break;
        while (i < n && item_end(it + i * ITEM) <= a)
            i++;
        if (grow(&data, PREFIX_LEN) < 0)
            goto done;
        memcpy(data.buf + data.len, PREFIX, PREFIX_LEN);
        data.len += PREFIX_LEN;
        span_t cur;
        int have = 0;
        for (Py_ssize_t j = i; j < n; j++) {
            const uint8_t *p = it + j * ITEM;
            uint64_t off = le64(p);
            if (off >= e)
                break;
            uint64_t bytenr = le64(p + 16);
            if (bytenr == 0)
                continue;
            uint64_t end = item_end(p), s = off > a ? off : a, t = end < e ? end : e;
            if (s >= t)
                continue;
            uint64_t disk = le64(p + 24), base = off - le64(p + 32), gen = le64(p + 40);
            uint8_t kind = p[48], comp = p[49];
            if (have && cur.end == s && cur.bytenr == bytenr && cur.disk == disk &&
                cur.gen == gen && cur.kind == kind && cur.comp == comp && cur.base == base) {
                cur.end = t;
                continue;
            }
            if (have && put_span(&data, &cur) < 0)
                goto done;
            cur = (span_t){s, t, bytenr, disk, gen, base, kind, comp};
            have = 1;
        }
        if (have && put_span(&data, &cur) < 0)
            goto done;
        if (grow(&ends, 8) < 0)
            goto done;
        put64(ends.buf + ends.len, data.len);
        ends.len += 8;
    }
    if (k < ncells) {
        uint64_t a = le64(bd + 8 * k);
        while (i < n && item_end(it + i * ITEM) <= a)
            i++;
    } else {
        i = n;
    }
    result = Py_BuildValue("(y#y#nn)", data.buf ? (char *)data.buf : "", (Py_ssize_t)data.len,
                           ends.buf ? (char *)ends.buf : "", (Py_ssize_t)ends.len, k, i);
done:
    PyMem_Free(data.buf);
    PyMem_Free(ends.buf);
    PyBuffer_Release(&items);
    PyBuffer_Release(&bounds);
    return result;
}

static PyMethodDef methods[] = {
    {"inputs", inputs, METH_VARARGS,
     "inputs(items, bounds, k, final) -> (data, ends, k_next, keep): the digest input of "
     "the cells from k on that the extent items complete."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.send._cells",
    "The digest input of a file's cells from its extent items (btrdelta.send.extents).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__cells(void) { return PyModule_Create(&module); }

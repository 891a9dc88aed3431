/*
 * btrdelta.send._cells: the digest input of a file's cells from its extent items, in C.
 *
 * A record keeps the extent items of a file past its bound as cells (btrdelta.send.extents,
 * docs/formats/sendshot.md 3a): ranges of the file, each with a BLAKE3 digest of the data
 * ranges it maps, as maximal runs of one key (the same extent, at the same place) clipped to
 * it. extents.py makes that input in Python (_inputs_py: the reference, used when this
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

#include "_constants.h"

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

static void put_span(uint8_t *p, const span_t *s) {
    put64(p, s->start);
    put64(p + 8, s->end);
    put64(p + 16, s->bytenr);
    put64(p + 24, s->disk);
    put64(p + 32, s->gen);
    p[40] = s->kind;
    p[41] = s->comp;
    put64(p + 42, s->base);
}

/* The cells from *k on that the n items complete, their input written to data and each
 * one's end to ends when these are not NULL (a first walk only measures: the output is
 * made once, at its size); returns the input's length, and sets *k, *keep and *nends. */
static size_t walk(const uint8_t *it, Py_ssize_t n, const uint8_t *bd, Py_ssize_t ncells,
                   int final, Py_ssize_t *k, Py_ssize_t *keep, Py_ssize_t *nends,
                   uint8_t *data, uint8_t *ends) {
    size_t len = 0;
    Py_ssize_t i = 0, c = *k, m = 0;
    uint64_t last = n ? item_end(it + (n - 1) * ITEM) : 0;
    for (; c < ncells; c++) {
        uint64_t a = le64(bd + 8 * c), e = le64(bd + 8 * (c + 1));
        if (!final && last < e)
            break;
        while (i < n && item_end(it + i * ITEM) <= a)
            i++;
        if (data)
            memcpy(data + len, PREFIX, PREFIX_LEN);
        len += PREFIX_LEN;
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
            if (have) {
                if (data)
                    put_span(data + len, &cur);
                len += SPAN;
            }
            cur = (span_t){s, t, bytenr, disk, gen, base, kind, comp};
            have = 1;
        }
        if (have) {
            if (data)
                put_span(data + len, &cur);
            len += SPAN;
        }
        if (ends)
            put64(ends + 8 * m, len);
        m++;
    }
    if (c < ncells) {
        uint64_t a = le64(bd + 8 * c);
        while (i < n && item_end(it + i * ITEM) <= a)
            i++;
    } else {
        i = n;
    }
    *k = c;
    *keep = i;
    *nends = m;
    return len;
}

static PyObject *inputs(PyObject *self, PyObject *args) {
    Py_buffer items, bounds;
    Py_ssize_t k;
    int final;
    if (!PyArg_ParseTuple(args, "y*y*np", &items, &bounds, &k, &final))
        return NULL;
    PyObject *result = NULL, *data = NULL, *ends = NULL;
    Py_ssize_t n = items.len / ITEM, ncells = bounds.len / 8 - 1;
    if (items.len % ITEM || bounds.len % 8 || k < 0) {
        PyErr_SetString(PyExc_ValueError, "items of 50 bytes, bounds of 8, k >= 0");
        goto done;
    }
    Py_ssize_t k2 = k, keep, nends;
    size_t len = walk(items.buf, n, bounds.buf, ncells, final, &k2, &keep, &nends, NULL,
                      NULL);
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    ends = data ? PyBytes_FromStringAndSize(NULL, nends * 8) : NULL;
    if (ends == NULL)
        goto done;
    walk(items.buf, n, bounds.buf, ncells, final, &k, &keep, &nends,
         (uint8_t *)PyBytes_AS_STRING(data), (uint8_t *)PyBytes_AS_STRING(ends));
    result = Py_BuildValue("(OOnn)", data, ends, k, keep);
done:
    Py_XDECREF(data);
    Py_XDECREF(ends);
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

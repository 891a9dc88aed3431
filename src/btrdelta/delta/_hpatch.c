/*
 * btrdelta.delta._hpatch: an HDiffPatch HDIFF13 patch applied in memory, in C.
 *
 * Strategy: codecs/hdiff.py parses the patch's header and inflates its four streams (covers,
 * RLE control, RLE code, new data: zstd frames or stored) and calls apply(); the
 * ``hdiffpatch`` package stays the reference and the only place with error messages. apply()
 * returns None for anything it does not take exactly as HDiffPatch's patch.c would
 * (patchByClip with the HDIFF13 covers, _TBytesRle_load_stream): the caller then applies
 * the patch with the library, which accepts it or names what is wrong. It writes the new
 * content straight into the bytes object it returns, with the GIL released, so the
 * receiving thread goes on meanwhile; the old content is any buffer. (Asking for
 * transparent huge pages for a large output, MADV_HUGEPAGE, halved its page faults and
 * cost ~70 ms of CPU more per scipy receive on a loaded machine: compaction.)
 *
 * The new content, in order: the new-data stream fills the gaps between covers, a cover
 * copies old bytes; a byte-wise RLE "difference" stream that runs over the whole new
 * content is added to the covers' bytes (and skipped over the gaps). A cover is three
 * packed integers of the covers stream: the old position as a signed step from the end of
 * the previous cover's old range (the sign in the first byte's top bit), the gap before it
 * in the new content, and its length.
 *
 * equal_runs() serves a patched file's receive on btrfs (delta/patching.py): the runs of
 * blocks of the new content equal to the old file's at the same offsets, which are cloned
 * from the parent instead of written; one memcmp a block, the GIL released. A content
 * mapped over its old file (Output) knows which of its 4 KiB blocks the patch wrote
 * (dirty[]): the others are the old file's pages as they are, equal without a memcmp
 * (scipy's 35 MB OpenBLAS: 21 MB of them, neither compared nor faulted in from the old
 * file's mapping).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

/* generated: the numbers the accelerators share with Python (none is needed here: an
 * HDIFF13 patch has no btrfs numbers; included as every accelerator includes it) */
#include "_constants.h"

typedef struct {
    const uint8_t *p, *end;
} Src;

/* HDiffPatch's packed integer with a tag of `tag_bits` high bits in its first byte (0 or
 * more): the rest of the first byte's bits are a continuation bit and the value's top
 * bits, then 7 bits a byte (high bit: more follow). -1 when truncated or over 64 bits. */
static int
unpack(Src *s, unsigned tag_bits, uint64_t *out)
{
    if (s->p >= s->end)
        return -1;
    uint8_t code = *s->p++;
    uint64_t value = code & ((1u << (7 - tag_bits)) - 1);
    if (code & (1u << (7 - tag_bits))) {
        do {
            if ((value >> (64 - 7)) != 0 || s->p >= s->end)
                return -1;
            code = *s->p++;
            value = value << 7 | (code & 0x7F);
        } while (code & 0x80);
    }
    *out = value;
    return 0;
}

/* the RLE difference stream: a run being applied (a byte added `set_len` times, or
 * `copy_len` bytes of the code stream added) and what is left of both streams */
typedef struct {
    uint64_t set_len, copy_len;
    uint8_t set_value;
    Src ctrl, code;
} Rle;

/* the output's 4 KiB blocks written to (one byte each), or NULL where not followed */
#define DIRTY_SHIFT 12

static inline void
mark(uint8_t *dirty, uint64_t at, uint64_t n)
{
    if (dirty != NULL && n)
        memset(dirty + (at >> DIRTY_SHIFT), 1,
               (size_t)(((at + n - 1) >> DIRTY_SHIFT) - (at >> DIRTY_SHIFT) + 1));
}

/* the runs of the next n bytes added to dst (dst NULL: skipped); -1 if the streams end
 * before. `dirty`: the blocks written (dst - base: their offset) are marked */
static int
rle_add(Rle *r, uint8_t *dst, uint64_t n, uint8_t *dirty, const uint8_t *base)
{
    for (;;) {
        if (r->set_len) {
            uint64_t k = r->set_len < n ? r->set_len : n;
            if (dst != NULL) {
                if (r->set_value) {
                    for (uint64_t i = 0; i < k; i++)
                        dst[i] += r->set_value;
                    mark(dirty, (uint64_t)(dst - base), k);
                }
                dst += k;
            }
            r->set_len -= k;
            n -= k;
        }
        if (r->copy_len && n) {
            uint64_t k = r->copy_len < n ? r->copy_len : n;
            if ((uint64_t)(r->code.end - r->code.p) < k)
                return -1;
            if (dst != NULL) {
                const uint8_t *src = r->code.p;
                for (uint64_t i = 0; i < k; i++)
                    dst[i] += src[i];
                mark(dirty, (uint64_t)(dst - base), k);
                dst += k;
            }
            r->code.p += k;
            r->copy_len -= k;
            n -= k;
        }
        if (n == 0)
            return 0;
        /* the next run */
        if (r->ctrl.p >= r->ctrl.end)
            return -1;
        unsigned type = *r->ctrl.p >> 6;
        uint64_t len;
        if (unpack(&r->ctrl, 2, &len) < 0 || len == UINT64_MAX)
            return -1;
        len += 1;
        switch (type) {
        case 0: /* zeros */
        case 1: /* 255s */
            r->set_value = type ? 255 : 0;
            r->set_len = len;
            break;
        case 2: /* one byte, repeated */
            if (r->code.p >= r->code.end)
                return -1;
            r->set_value = *r->code.p++;
            r->set_len = len;
            break;
        default: /* bytes */
            r->copy_len = len;
            break;
        }
    }
}

/* the whole patch into out[0:new_size]; -1 where patch.c would fail (or could not be
 * followed exactly). `written`: how far out[] is written, updated as it goes (read by
 * the prefault thread). `over_old`: out[0:old_size] holds the old content already (a
 * private mapping of the old file): a cover at the same offset is not copied. `dirty`
 * (or NULL): the blocks of out[] written are marked */
static int
patch(const uint8_t *old, uint64_t old_size, uint8_t *out, uint64_t new_size, Src covers,
      uint64_t cover_count, Rle *rle, Src data, uint64_t *written, int over_old,
      uint8_t *dirty)
{
    uint64_t old_back = 0, new_back = 0;
    for (uint64_t i = 0; i < cover_count; i++) {
        __atomic_store_n(written, new_back, __ATOMIC_RELAXED);
        if (covers.p >= covers.end)
            return -1;
        int negative = *covers.p >> 7;
        uint64_t step, gap, length;
        if (unpack(&covers, 1, &step) < 0 || unpack(&covers, 0, &gap) < 0 ||
            unpack(&covers, 0, &length) < 0)
            return -1;
        if (negative ? step > old_back : step > UINT64_MAX - old_back)
            return -1;
        uint64_t old_pos = negative ? old_back - step : old_back + step;
        if (gap > new_size - new_back || length > new_size - new_back - gap ||
            old_pos > old_size || length > old_size - old_pos)
            return -1;
        if (gap) { /* new data */
            if ((uint64_t)(data.end - data.p) < gap || rle_add(rle, NULL, gap, NULL, out) < 0)
                return -1;
            memcpy(out + new_back, data.p, gap);
            mark(dirty, new_back, gap);
            data.p += gap;
            new_back += gap;
        }
        /* over the old file (over_old), out[new_back:] is untouched yet: the old bytes at
         * the same offset are there already, their pages still the page cache's */
        if (!over_old || old_pos != new_back) {
            memcpy(out + new_back, old + old_pos, length);
            mark(dirty, new_back, length);
        }
        if (rle_add(rle, out + new_back, length, dirty, out) < 0)
            return -1;
        new_back += length;
        old_back = old_pos + length;
    }
    uint64_t gap = new_size - new_back;
    if (gap) {
        if ((uint64_t)(data.end - data.p) < gap || rle_add(rle, NULL, gap, NULL, out) < 0)
            return -1;
        memcpy(out + new_back, data.p, gap);
        mark(dirty, new_back, gap);
        data.p += gap;
    }
    /* every stream used up, as patch.c requires */
    if (covers.p != covers.end || data.p != data.end || rle->set_len || rle->copy_len ||
        rle->ctrl.p != rle->ctrl.end || rle->code.p != rle->code.end)
        return -1;
    return 0;
}

/* An output of PREFAULT_MIN bytes or more is fresh memory whose every page faults when
 * first written (~3.5 us a page here, a virtual machine: 30 ms of scipy's 35 MB library,
 * most of its patch): a second thread faults it in (MADV_POPULATE_WRITE, which leaves
 * the content alone) from the end backwards, PREFAULT_STEP at a time, until it meets the
 * patch's writes, so the two share the faults. Where the kernel has no such advice the
 * thread just stops. */
#define PREFAULT_MIN (8u << 20)
#define PREFAULT_STEP (1u << 20)

typedef struct {
    uint8_t *out, *start, *end; /* out[0:]: the output; start:end the range faulted in */
    const uint64_t *written;
} Prefault;

static void *
prefault(void *arg)
{
    Prefault *pf = arg;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)pf->start + page - 1) & ~(page - 1);
    uintptr_t hi = (uintptr_t)pf->end & ~(page - 1);
    while (hi > lo) {
        uintptr_t from = hi - lo > PREFAULT_STEP ? hi - PREFAULT_STEP : lo;
        if ((uintptr_t)pf->out + __atomic_load_n(pf->written, __ATOMIC_RELAXED) >= from)
            break;
        if (madvise((void *)from, hi - from, MADV_POPULATE_WRITE) != 0)
            break;
        hi = from;
    }
    return NULL;
}

/* The output mapped over the old file: a private (copy-on-write) mapping of the old file
 * for the old size's pages, anonymous memory after them where the new content is larger.
 * A cover at the same offset is then not copied (patch()'s over_old): where the new
 * content is the old one in place (scipy's 35 MB OpenBLAS: 21 of its 35 MB), its pages
 * stay the page cache's, neither allocated nor faulted in as fresh memory (~3-8 us a
 * page on this virtual machine) nor copied; the digest and equal_runs() read them as the
 * old file's. Only for an old file that cannot change (a read-only snapshot's: a page
 * not yet written shows the file's bytes) and of the size the patch says. */
typedef struct {
    PyObject_HEAD
    uint8_t *base;
    size_t map_len;
    Py_ssize_t size;
    /* the blocks patch() wrote (DIRTY_SHIFT), or NULL (not followed: all compared), and
     * the old content apply() was given, which equal_runs() must be given too for the
     * blocks not written to count as equal without a memcmp */
    uint8_t *dirty;
    const void *old_buf;
    Py_ssize_t old_len;
} Output;

static int
output_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    Output *o = (Output *)self;
    return PyBuffer_FillInfo(view, self, o->base, o->size, 1, flags);
}

static Py_ssize_t
output_length(PyObject *self)
{
    return ((Output *)self)->size;
}

static void
output_dealloc(PyObject *self)
{
    Output *o = (Output *)self;
    if (o->base != NULL)
        munmap(o->base, o->map_len);
    PyMem_Free(o->dirty);
    Py_TYPE(self)->tp_free(self);
}

static PyBufferProcs output_as_buffer = {output_getbuffer, NULL};
static PySequenceMethods output_as_sequence = {.sq_length = output_length};

static PyTypeObject OutputType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "btrdelta.delta._hpatch.Output",
    .tp_doc = "A patched content mapped over its old file (read-only buffer).",
    .tp_basicsize = sizeof(Output),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = output_dealloc,
    .tp_as_buffer = &output_as_buffer,
    .tp_as_sequence = &output_as_sequence,
};

/* an Output of new_size bytes over old file `fd` of old_size bytes; NULL with no error
 * set where it cannot be made (the caller then uses fresh memory) */
static Output *
output_over(int fd, uint64_t old_size, uint64_t new_size)
{
    struct stat st;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (new_size == 0 || new_size > (uint64_t)PY_SSIZE_T_MAX - page ||
        fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != old_size)
        return NULL;
    size_t map_len = ((size_t)new_size + page - 1) & ~(page - 1);
    size_t file_len = ((size_t)old_size + page - 1) & ~(page - 1);
    if (file_len > map_len)
        file_len = map_len;
    uint8_t *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    if (file_len && mmap(base, file_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd,
                         0) == MAP_FAILED) {
        munmap(base, map_len);
        return NULL;
    }
    Output *o = PyObject_New(Output, &OutputType);
    if (o == NULL) {
        munmap(base, map_len);
        PyErr_Clear();
        return NULL;
    }
    o->base = base;
    o->map_len = map_len;
    o->size = (Py_ssize_t)new_size;
    /* (no memory for it: nothing followed, every block compared) */
    o->dirty = PyMem_Calloc((size_t)((new_size + (1u << DIRTY_SHIFT) - 1) >> DIRTY_SHIFT), 1);
    o->old_buf = NULL;
    o->old_len = -1;
    return o;
}

static PyObject *
apply(PyObject *self, PyObject *args)
{
    Py_buffer old, covers, ctrl, code, data;
    unsigned long long new_size, cover_count;
    int over_fd = -1;
    if (!PyArg_ParseTuple(args, "y*Ky*Ky*y*y*|i:apply", &old, &new_size, &covers, &cover_count,
                          &ctrl, &code, &data, &over_fd))
        return NULL;
    PyObject *result = NULL;
    if (new_size > (unsigned long long)PY_SSIZE_T_MAX) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *out;
    uint8_t *o;
    size_t fresh_from = 0; /* out[fresh_from:] is fresh memory (the prefault thread's) */
    Output *over = over_fd >= 0 ? output_over(over_fd, (uint64_t)old.len, new_size) : NULL;
    uint8_t *dirty = NULL;
    if (over != NULL) {
        out = (PyObject *)over;
        o = over->base;
        dirty = over->dirty;
        over->old_buf = old.buf;
        over->old_len = old.len;
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        fresh_from = ((size_t)old.len + page - 1) & ~(page - 1);
        if (fresh_from > new_size)
            fresh_from = new_size;
    }
    else {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)new_size);
        if (out == NULL)
            goto done;
        o = (uint8_t *)PyBytes_AS_STRING(out);
    }
    Src cv = {covers.buf, (const uint8_t *)covers.buf + covers.len};
    Rle rle = {0};
    rle.ctrl = (Src){ctrl.buf, (const uint8_t *)ctrl.buf + ctrl.len};
    rle.code = (Src){code.buf, (const uint8_t *)code.buf + code.len};
    Src nd = {data.buf, (const uint8_t *)data.buf + data.len};
    int ret;
    uint64_t written = 0;
    Prefault pf = {o, o + fresh_from, o + new_size, &written};
    pthread_t helper;
    int helped = 0;
    Py_BEGIN_ALLOW_THREADS
    if (new_size - fresh_from >= PREFAULT_MIN)
        helped = pthread_create(&helper, NULL, prefault, &pf) == 0;
    ret = patch(old.buf, (uint64_t)old.len, o, new_size, cv, cover_count, &rle, nd, &written,
                over != NULL, dirty);
    if (helped) {
        __atomic_store_n(&written, new_size, __ATOMIC_RELAXED);
        pthread_join(helper, NULL);
    }
    Py_END_ALLOW_THREADS
    if (ret < 0) {
        Py_DECREF(out);
        result = Py_NewRef(Py_None);
    }
    else
        result = out;
done:
    PyBuffer_Release(&old);
    PyBuffer_Release(&covers);
    PyBuffer_Release(&ctrl);
    PyBuffer_Release(&code);
    PyBuffer_Release(&data);
    return result;
}

/* append (offset, length) to `runs` when the run is at least `min_len` long */
static int
add_run(PyObject *runs, Py_ssize_t at, Py_ssize_t len, Py_ssize_t min_len)
{
    if (len < min_len)
        return 0;
    PyObject *run = Py_BuildValue("(nn)", at, len);
    if (run == NULL)
        return -1;
    int ret = PyList_Append(runs, run);
    Py_DECREF(run);
    return ret;
}

static PyObject *
equal_runs(PyObject *self, PyObject *args)
{
    Py_buffer new, old;
    Py_ssize_t start, end, block, min_len;
    if (!PyArg_ParseTuple(args, "y*y*nnnn:equal_runs", &new, &old, &start, &end, &block,
                          &min_len))
        return NULL;
    PyObject *runs = PyList_New(0);
    if (runs == NULL)
        goto done;
    if (block <= 0 || start < 0 || end > new.len || start % block)
        goto done;
    /* the last block may be short where it ends both contents */
    Py_ssize_t tail = new.len == old.len ? new.len : -1;
    Py_ssize_t nblocks = end > start ? (end - start + block - 1) / block : 0;
    uint8_t *same = PyMem_Malloc(nblocks ? (size_t)nblocks : 1);
    if (same == NULL) {
        Py_CLEAR(runs);
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *a = new.buf, *b = old.buf;
    /* an Output over the old content given here: a block it never wrote is that content */
    const uint8_t *dirty = NULL;
    if (Py_IS_TYPE(new.obj, &OutputType)) {
        Output *o = (Output *)new.obj;
        if (o->dirty != NULL && o->old_buf == old.buf && o->old_len == old.len)
            dirty = o->dirty;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nblocks; i++) {
        Py_ssize_t x = start + i * block;
        Py_ssize_t y = x + block < end ? x + block : end;
        int clean = 0;
        if (dirty != NULL && y <= old.len && y > x) {
            clean = 1;
            for (Py_ssize_t k = x >> DIRTY_SHIFT; k <= (y - 1) >> DIRTY_SHIFT; k++)
                if (dirty[k]) {
                    clean = 0;
                    break;
                }
        }
        same[i] = (y - x == block || y == tail) && y <= old.len
                  && (clean || memcmp(a + x, b + x, (size_t)(y - x)) == 0);
    }
    Py_END_ALLOW_THREADS
    Py_ssize_t run = -1;
    for (Py_ssize_t i = 0; i <= nblocks; i++) {
        Py_ssize_t x = start + i * block;
        if (i < nblocks && same[i]) {
            if (run < 0)
                run = x;
        }
        else if (run >= 0) {
            if (add_run(runs, run, (x < end ? x : end) - run, min_len) < 0) {
                Py_CLEAR(runs);
                break;
            }
            run = -1;
        }
    }
    PyMem_Free(same);
done:
    PyBuffer_Release(&new);
    PyBuffer_Release(&old);
    return runs;
}

static PyMethodDef methods[] = {
    {"apply", apply, METH_VARARGS,
     "apply(old, new_size, covers, cover_count, rle_ctrl, rle_code, new_data, over_fd=-1) -> "
     "bytes | Output | None: the new content of an HDIFF13 patch from its inflated streams, "
     "or None where HDiffPatch would refuse them (the caller then asks the library, for its "
     "error). over_fd: the old file, which must not change (a read-only snapshot's): the "
     "content is then an Output mapped over it (a read-only buffer), where it can be."},
    {"equal_runs", equal_runs, METH_VARARGS,
     "equal_runs(new, old, start, end, block, min_len) -> list[tuple[int, int]]: the runs "
     "(offset, length) of new[start:end] equal to old at the same offsets, in whole blocks "
     "from start (a multiple of block; the last may be short where it ends both), each at "
     "least min_len bytes. An Output new given the old content apply() was given: the "
     "blocks it did not write count as equal without a comparison."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hpatch",
    "Optional C path of applying HDiffPatch patches (see _hpatch.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__hpatch(void)
{
    if (PyType_Ready(&OutputType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Output", (PyObject *)&OutputType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

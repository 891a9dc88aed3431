/*
 * btrdelta._hugepages: the interpreter's small-object arenas and the top of the C heap in
 * transparent huge pages (madvise MADV_HUGEPAGE), for a short process whose first touch of
 * each fresh 4 KiB page is a large part of its time.
 *
 * A fresh anonymous page costs a page fault when it is first written: ~1.2 us here (a
 * virtual machine), against ~0.06 us a 4 KiB page when the kernel gives a 2 MiB huge page
 * at once. A small `btrdelta send --from-sendshot` made ~3,700 faults, ~2,900 of them after
 * the interpreter's start: its imports' objects in pymalloc's arenas (1 MiB each, an mmap
 * each) and its buffers in glibc's heap (docs/performance.md, session 24). Debian and most
 * distributions set transparent huge pages to "madvise": only regions advised get them.
 *
 * arenas(nbytes) -> bool: reserve nbytes of address space (rounded up to 2 MiB, aligned,
 * MAP_NORESERVE: nothing is used until it is touched), advise it MADV_HUGEPAGE, and make it
 * where pymalloc's arenas come from (PyObject_SetArenaAllocator): its arenas (1 MiB) are cut
 * from it in order; a freed one is given back to the kernel (MADV_DONTNEED, as munmap
 * would) and cut again later; once it is full, and for arenas made before the call, the
 * previous allocator (mmap) is used as before. Call it once, early (every arena made before
 * stays a plain mmap); False if already called or if the kernel has no transparent huge
 * pages (then nothing is changed). pymalloc calls the allocator with the GIL held: no lock.
 *
 * heap(pad) -> int: glibc only (0 elsewhere): make every growth of the heap ask the kernel
 * for pad bytes more than needed (M_TOP_PAD: fewer brk calls; the heap is trimmed to pad
 * instead of to 128 KiB), grow it once now, and advise the new part MADV_HUGEPAGE; returns
 * the bytes advised (0: the heap did not grow within 4 MiB of 64 KiB blocks, which is
 * where brk is refused and glibc maps its memory instead, or the advice was refused). The
 * part advised is the region the next pad bytes of heap buffers come from (a send raises
 * glibc's mmap threshold to 32 MiB: its buffers are heap memory); the heap beyond it is a
 * new mapping of 4 KiB pages (brk does not extend an advised one).
 *
 * What it costs: memory is taken 2 MiB at a time where it is touched (a small send's peak
 * RSS 21.8 -> 25.7 MB); where memory is fragmented the kernel gives 4 KiB pages instead
 * (the "defer+madvise" and "madvise" defrag settings may compact first, in the fault).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#define HUGE_PAGE ((size_t)2 << 20)
/* pymalloc's ARENA_SIZE on 64-bit CPython 3.10 and later; the allocator is also asked for
 * the frames' data stack chunks (16 KiB and more): any other size goes to the previous one */
#define ARENA_SIZE ((size_t)1 << 20)
/* freed arenas kept for reuse, at most (a 64 MiB region holds 64 arenas) */
#define MAX_FREED 256

static char *region, *region_next, *region_end;
static void *freed[MAX_FREED];
static int nfreed;
static PyObjectArenaAllocator previous;

static void *arena_alloc(void *ctx, size_t size) {
    if (size == ARENA_SIZE) {
        if (nfreed > 0)
            return freed[--nfreed];
        if ((size_t)(region_end - region_next) >= size) {
            void *p = region_next;
            region_next += size;
            return p;
        }
    }
    return previous.alloc(previous.ctx, size);
}

static void arena_free(void *ctx, void *ptr, size_t size) {
    if ((char *)ptr >= region && (char *)ptr < region_end) {
        madvise(ptr, size, MADV_DONTNEED); /* its pages back to the kernel */
        if (nfreed < MAX_FREED)
            freed[nfreed++] = ptr;
        return;
    }
    previous.free(previous.ctx, ptr, size);
}

static PyObject *arenas(PyObject *self, PyObject *arg) {
    size_t n = PyLong_AsSize_t(arg);
    if (n == (size_t)-1 && PyErr_Occurred())
        return NULL;
#ifdef MADV_HUGEPAGE
    if (region != NULL || n == 0)
        Py_RETURN_FALSE;
    n = (n + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    char *p = mmap(NULL, n + HUGE_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        Py_RETURN_FALSE;
    char *start = (char *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (start > p) /* the unaligned ends: not needed */
        munmap(p, (size_t)(start - p));
    munmap(start + n, (size_t)(p + HUGE_PAGE - start));
    if (madvise(start, n, MADV_HUGEPAGE) != 0) {
        munmap(start, n);
        Py_RETURN_FALSE;
    }
    region = region_next = start;
    region_end = start + n;
    PyObject_GetArenaAllocator(&previous);
    PyObjectArenaAllocator mine = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&mine);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *heap(PyObject *self, PyObject *arg) {
    size_t pad = PyLong_AsSize_t(arg);
    if (pad == (size_t)-1 && PyErr_Occurred())
        return NULL;
#if defined(__GLIBC__) && defined(MADV_HUGEPAGE)
    if (pad > INT_MAX || !mallopt(M_TOP_PAD, (int)pad))
        return PyLong_FromLong(0);
    /* give the top's free space back first (an earlier large block freed may have raised
     * glibc's trim threshold: the top could hold megabytes), then allocate 64 KiB blocks
     * (below any mmap threshold) until the heap grows: what is left of the top is used up,
     * then one brk adds what was asked plus pad */
    malloc_trim(0);
    char *before = sbrk(0), *after = before;
    void *held[64];
    int k = 0;
    while (k < 64 && after == before) {
        held[k] = malloc((size_t)64 << 10);
        if (held[k] == NULL)
            break;
        k++;
        after = sbrk(0);
    }
    while (k > 0)
        free(held[--k]);
    if (after != before) /* the frees trim the top back to pad: advise what stays mapped
                          * (the end of the growth may be gone: madvise refused it) */
        after = sbrk(0);
    char *lo = (char *)(((uintptr_t)before + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    char *hi = (char *)((uintptr_t)after & ~(uintptr_t)(HUGE_PAGE - 1));
    if (before == (char *)-1 || hi <= lo || madvise(lo, (size_t)(hi - lo), MADV_HUGEPAGE) != 0)
        return PyLong_FromLong(0);
    return PyLong_FromSize_t((size_t)(hi - lo));
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"arenas", arenas, METH_O,
     "arenas(nbytes) -> bool: pymalloc's arenas from nbytes of address space advised "
     "MADV_HUGEPAGE."},
    {"heap", heap, METH_O,
     "heap(pad) -> int: glibc's heap grown by pad bytes more than asked (M_TOP_PAD), its "
     "next pad bytes advised MADV_HUGEPAGE; the bytes advised."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta._hugepages",
    "The interpreter's arenas and the C heap's top in transparent huge pages.", -1, methods,
};

PyMODINIT_FUNC PyInit__hugepages(void) { return PyModule_Create(&module); }

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
 * arenas(nbytes[, slow_ns[, min_free]]) -> bool: reserve nbytes of address space (rounded
 * up to 2 MiB, aligned, MAP_NORESERVE: nothing is used until it is touched), advise it
 * MADV_HUGEPAGE, and make it where pymalloc's arenas come from (PyObject_SetArenaAllocator):
 * its arenas (1 MiB) are cut from it in order; a freed one is given back to the kernel
 * (MADV_DONTNEED, as munmap would) and cut again later; once it is full, and for arenas
 * made before the call, the previous allocator (mmap) is used as before. Call it once,
 * early (every arena made before stays a plain mmap); False if already called, if the
 * kernel has no transparent huge pages, or if it has fewer than min_free (default 1) free
 * blocks of a huge page or more (below) (then nothing is changed). pymalloc calls the
 * allocator with the GIL held: no lock.
 *
 * heap(pad) -> int: glibc only (0 elsewhere): make every growth of the heap ask the kernel
 * for pad bytes more than needed (M_TOP_PAD: fewer brk calls; the heap is trimmed to pad
 * instead of to 128 KiB), grow it once now, and advise the new part MADV_HUGEPAGE; returns
 * the bytes advised (0: the heap did not grow within 4 MiB of 64 KiB blocks, which is
 * where brk is refused and glibc maps its memory instead, the advice was refused, or one
 * of its huge pages was slow after arenas(): below). The
 * part advised is the region the next pad bytes of heap buffers come from (a send raises
 * glibc's mmap threshold to 32 MiB: its buffers are heap memory); the heap beyond it is a
 * new mapping of 4 KiB pages (brk does not extend an advised one).
 *
 * What it costs: memory is taken 2 MiB at a time where it is touched (a small send's peak
 * RSS 21.8 -> 25.7 MB); where memory is fragmented the kernel gives 4 KiB pages instead
 * (the "defer+madvise" and "madvise" defrag settings may compact first, in the fault).
 *
 * And a huge page can cost far more than the 512 faults of 4 KiB pages it saves (~0.6-1.2
 * ms here; docs/performance.md, issue 15, session 27):
 * - where free memory is short or fragmented (the page cache filling it), no free block of
 *   2 MiB is left, and every huge-page fault of an advised region first compacts memory,
 *   in the fault, then often falls back to a 4 KiB page all the same (a large send: ~17
 *   such faults, ~50 compaction stalls, its system time 18 -> 30-130 ms). So arenas()
 *   first counts the free blocks of 2 MiB or more (/proc/buddyinfo, ~8 us) and declines
 *   with fewer than min_free (1 by default: none at all; the huge pages a process just
 *   freed likely wait in per-CPU lists, which /proc/buddyinfo does not count, and the next
 *   process takes them cheaply: a read-only send after the live one, 6 free blocks listed,
 *   had its 17 huge pages without a stall);
 * - on a virtual machine that hands its free 2 MiB blocks back to the host (virtio-balloon
 *   free page reporting: page_reporting_order 9), a huge page cut from such a block pays
 *   the host's faults as it is zeroed (~5 ms against ~0.1), and once the blocks reached
 *   are such, the next ones are too. So every huge page the arenas' region gives is timed
 *   as it is first written (the thread's CPU time around a write of its first byte, when
 *   its first arena is cut), and heap() faults the first 4 MiB of the heap's advised part
 *   in at once, page by page, each timed (every send writes those two pages; the rest is
 *   faulted as glibc hands it out, untimed: a small in-place round writes 4-8 MiB of the
 *   heap, a tiny round on a Debian root ~20 MiB; the 16 MiB faulted here until session 33
 *   zeroed 4-6 huge pages the small round never wrote, ~0.1 ms each, ~0.65 when this VM's
 *   free blocks were slow, 1 ms counting as slow):
 *   once one took more than slow_ns (default 1 ms), the rest of the region and
 *   the heap's advised part are advised MADV_NOHUGEPAGE (the huge pages given stay), and
 *   heap() returns 0: 4 KiB pages from there on, which come from small free blocks, without
 *   compaction. declined() says whether that happened.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#define HUGE_PAGE ((size_t)2 << 20)
/* pymalloc's ARENA_SIZE on 64-bit CPython 3.10 and later; the allocator is also asked for
 * the frames' data stack chunks (16 KiB and more): any other size goes to the previous one */
#define ARENA_SIZE ((size_t)1 << 20)
/* the heap's advised part faulted in and timed by heap(), at most: what every send writes
 * of it (the small in-place round of `benchmarks sendshot` 4-8 MiB, a send on a Debian root
 * ~20 MiB; all of 32 MiB was ~10 MB of peak RSS more) */
#define HEAP_TIMED ((size_t)4 << 20)
/* freed arenas kept for reuse, at most (a 64 MiB region holds 64 arenas) */
#define MAX_FREED 256

static char *region, *region_next, *region_end;
static void *freed[MAX_FREED];
static int nfreed;
static PyObjectArenaAllocator previous;
/* a huge page's first write that took more of the thread's CPU time than this was slow */
static long long slow_ns;
/* the heap's part advised MADV_HUGEPAGE (heap()); whether a slow huge page was seen */
static char *heap_lo, *heap_hi;
static int declined;

static long long thread_ns(void) {
    struct timespec t;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) != 0)
        return 0;
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

#ifdef MADV_NOHUGEPAGE
/* the region's huge pages from `from` (rounded up to one) and the heap's advised part in
 * 4 KiB pages */
static void decline(char *from) {
    declined = 1;
    from = (char *)(((uintptr_t)from + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (region != NULL && from < region_end)
        madvise(from, (size_t)(region_end - from), MADV_NOHUGEPAGE);
    if (heap_hi > heap_lo)
        madvise(heap_lo, (size_t)(heap_hi - heap_lo), MADV_NOHUGEPAGE);
}
#endif

static void *arena_alloc(void *ctx, size_t size) {
    if (size == ARENA_SIZE) {
        if (nfreed > 0)
            return freed[--nfreed];
        if ((size_t)(region_end - region_next) >= size) {
            char *p = region_next;
            region_next += size;
#ifdef MADV_NOHUGEPAGE
            if (!declined && ((uintptr_t)p & (HUGE_PAGE - 1)) == 0) {
                /* a fresh huge page (a zero byte written on zeros: pymalloc sees no change) */
                long long t = thread_ns();
                *(volatile char *)p = 0;
                if (thread_ns() - t > slow_ns)
                    decline(p + HUGE_PAGE);
            }
#endif
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

/* the free blocks of a huge page or more, in huge pages, of the zones a process's memory
 * comes from (/proc/buddyinfo, but the DMA zone's); -1 where it cannot be read */
static long long free_huge_blocks(void) {
    FILE *f = fopen("/proc/buddyinfo", "r");
    if (f == NULL)
        return -1;
    long page = sysconf(_SC_PAGESIZE);
    int order = 0;
    while (page > 0 && order < 20 && ((size_t)page << order) < HUGE_PAGE)
        order++;
    char line[512];
    long long total = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        char *p = strstr(line, "zone");
        if (p == NULL)
            continue;
        p += 4;
        while (*p == ' ')
            p++;
        char *name = p;
        while (*p != '\0' && *p != ' ')
            p++;
        if (p - name == 3 && strncmp(name, "DMA", 3) == 0)
            continue;
        for (int k = 0; k < 40; k++) {
            char *end;
            long long count = strtoll(p, &end, 10);
            if (end == p)
                break;
            if (k >= order)
                total += count << (k - order < 20 ? k - order : 20);
            p = end;
        }
    }
    fclose(f);
    return total;
}

static PyObject *arenas(PyObject *self, PyObject *args) {
    Py_ssize_t want;
    long long slow = 1000000, min_free = 1;
    if (!PyArg_ParseTuple(args, "n|LL", &want, &slow, &min_free))
        return NULL;
    if (want < 0 || slow < 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes and slow_ns must not be negative");
        return NULL;
    }
    size_t n = (size_t)want;
#ifdef MADV_HUGEPAGE
    if (region != NULL || n == 0)
        Py_RETURN_FALSE;
    if (min_free > 0) {
        long long blocks = free_huge_blocks();
        if (blocks >= 0 && blocks < min_free)
            Py_RETURN_FALSE;
    }
    slow_ns = slow;
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
    if (before == (char *)-1 || hi <= lo || declined ||
        madvise(lo, (size_t)(hi - lo), MADV_HUGEPAGE) != 0)
        return PyLong_FromLong(0);
    heap_lo = lo;
    heap_hi = hi;
    if (region != NULL) {
        /* its huge pages faulted now, each timed, up to a slow one (the top's free memory:
         * zeros, no chunk's header yet): most of a send's huge pages are the heap's */
        for (char *q = lo; q < hi && q < lo + HEAP_TIMED; q += HUGE_PAGE) {
            long long t = thread_ns();
            *(volatile char *)q = 0;
            if (thread_ns() - t > slow_ns) {
                decline(region_next);
                return PyLong_FromLong(0);
            }
        }
    }
    return PyLong_FromSize_t((size_t)(hi - lo));
#else
    return PyLong_FromLong(0);
#endif
}

static PyObject *declined_(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(declined);
}

static PyMethodDef methods[] = {
    {"arenas", arenas, METH_VARARGS,
     "arenas(nbytes, slow_ns=1000000, min_free=1) -> bool: pymalloc's arenas from nbytes "
     "of address space advised MADV_HUGEPAGE, unless the kernel has fewer than min_free "
     "free blocks of a huge page; once a huge page's first write takes more than slow_ns "
     "of CPU time, the rest of it and the heap's advised part in 4 KiB pages."},
    {"declined", declined_, METH_NOARGS,
     "declined() -> bool: whether a slow huge page put the rest in 4 KiB pages."},
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

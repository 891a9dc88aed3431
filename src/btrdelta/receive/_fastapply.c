/*
 * btrdelta.receive._fastapply: the common send-stream commands applied in C.
 *
 * Strategy: the Python Applier (applier.py) stays the reference. It handles every command,
 * every fallback and every error message. This module runs the hot, simple commands of a
 * batch of records with the same system calls and the same path rules as the Python code:
 * MKFILE, MKDIR, SYMLINK, RENAME, LINK, UNLINK, RMDIR, WRITE, TRUNCATE, CHMOD, CHOWN, UTIMES,
 * UPDATE_EXTENT, (when enabled, on btrfs) ENCODED_WRITE passed through with the
 * encoded-write ioctl, and CLONE (FICLONERANGE) from the one source subvolume Python
 * registered with set_clone_source(). It stops *before* the first record it does not
 * handle, whose path breaks a rule, or whose system call fails, with nothing of that
 * record applied; the Python applier then applies that record itself and raises the located error or takes its
 * fallback (EOPNOTSUPP, decompression, copying what cannot be cloned, ...). Records that
 * need more (SUBVOL, SNAPSHOT, END, xattrs, special files, FALLOCATE, FILEATTR, verity)
 * always go to Python.
 *
 * Path rules (fs/sandbox.py): a stream path is split on '/', every component must be non-empty
 * and neither "." nor ".."; no NUL. Directories are opened one component at a time with
 * openat(O_DIRECTORY | O_NOFOLLOW) from the subvolume root descriptor, so no symlink is ever
 * followed, and the last component is used with the *at call that does not follow it.
 * Opened directories are cached by path; a RENAME or RMDIR drops every entry at or below
 * the paths it changed.
 *
 * A run gathers the fields of its records with the GIL held (up to the first record Python
 * must apply), then makes all their system calls with the GIL released once, so a reader
 * thread (decoding, or expanding a delta stream) runs meanwhile without a hand-over per
 * system call.
 *
 * Hand-over with Python: one cached write descriptor (the file last created or written)
 * moves between the two sides with give_write()/take_write(); take_dirs_changed() tells
 * Python to drop its own directory cache after C renamed or removed directories, and
 * clear_dirs() does the same on this side after Python did.
 *
 * Write-behind (write_behind(), off by default): a receiver that writes its destination out
 * at the end (replicate's, before it commits) has each large file's data written out as
 * it comes, so that the final syncfs does not write it all at once.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_constants.h" /* generated: MAX_UNENCODED, DIR_FLAGS, ioctl numbers, ... */

enum {
    OP_MKFILE,
    OP_MKDIR,
    OP_SYMLINK,
    OP_RENAME,
    OP_LINK,
    OP_UNLINK,
    OP_RMDIR,
    OP_WRITE,
    OP_TRUNCATE,
    OP_CHMOD,
    OP_CHOWN,
    OP_UTIMES,
    OP_UPDATE_EXTENT,
    OP_ENCODED_WRITE,
    OP_CLONE,
    NOPS
};

/* struct btrfs_ioctl_encoded_io_args and BTRFS_IOC_ENCODED_WRITE (linux/btrfs.h) */
struct encoded_io_args {
    const struct iovec *iov;
    unsigned long iovcnt;
    int64_t offset;
    uint64_t flags;
    uint64_t len;
    uint64_t unencoded_len;
    uint64_t unencoded_offset;
    uint32_t compression;
    uint32_t encryption;
    uint8_t reserved[64];
};

/* struct file_clone_range and FICLONERANGE (linux/fs.h) */
struct clone_range_args {
    int64_t src_fd;
    uint64_t src_offset;
    uint64_t src_length;
    uint64_t dest_offset;
};

static PyTypeObject *op_types[NOPS];
static PyObject *s_path, *s_path_to, *s_path_link, *s_target, *s_data, *s_offset, *s_size,
    *s_mode, *s_uid, *s_gid, *s_atime, *s_mtime, *s_unencoded_file_len, *s_unencoded_len,
    *s_unencoded_offset, *s_compression, *s_encryption, *s_length, *s_clone_path,
    *s_clone_offset, *s_clone_uuid, *s_bytes;

typedef struct {
    char *path;
    size_t len;
    uint64_t hash;
    int fd;
} DirEnt;

/* a descriptor held open for a path (owned; fd -1: none); for the write descriptor, the
 * range [lo, hi) written since its write-out was last started and the bytes written in it */
typedef struct {
    int fd;
    char *path;
    size_t len, cap;
    long long lo, hi, pend;
} Held;

typedef struct {
    PyObject_HEAD
    int root_fd; /* borrowed from the Python sandbox; -1 = no subvolume */
    int encoded; /* pass ENCODED_WRITE through with the ioctl */
    Held w;      /* the write descriptor: the file last created or written */
    long long behind; /* write_behind(): start a write-out every this many bytes (0: never) */
    DirEnt *dirs;
    size_t ndirs, dcap;
    int dirs_changed;
    struct Op *ops; /* gathered records of a run */
    size_t ocap;
    /* CLONE source: the subvolume of uuid clone_uuid (root fd borrowed from Python), and
     * its directory last opened (owned; dropped on a rename or rmdir when the source is
     * the subvolume being received, the only one this receive changes) */
    int clone_fd;
    unsigned char clone_uuid[16];
    Held src_dir;
    /* track(): the count of records applied is stored here after each one (a u64 in a
     * caller's writable buffer, e.g. a shared mapping of a file, so it survives a kill) */
    Py_buffer progress_view;
    volatile uint64_t *progress;
} Fast;

/* ---------------------------------------------------------------------------------------
 * paths */

/* 0 if `p` (n bytes) is a valid stream path naming an entry (non-empty). */
static int
check_path(const char *p, size_t n)
{
    if (n == 0 || memchr(p, 0, n) != NULL)
        return -1;
    const char *end = p + n;
    for (;;) {
        const char *s = memchr(p, '/', (size_t)(end - p));
        size_t len = s ? (size_t)(s - p) : (size_t)(end - p);
        if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            return -1;
        if (s == NULL)
            return 0;
        p = s + 1;
    }
}

static uint64_t
hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
    return h;
}

static int
dir_lookup(Fast *f, const char *p, size_t n, uint64_t h)
{
    for (size_t i = 0; i < f->ndirs; i++) {
        DirEnt *e = &f->dirs[i];
        if (e->hash == h && e->len == n && memcmp(e->path, p, n) == 0)
            return e->fd;
    }
    return -1;
}

static int
dir_add(Fast *f, const char *p, size_t n, uint64_t h, int fd)
{
    if (f->ndirs == f->dcap) {
        size_t cap = f->dcap ? f->dcap * 2 : 64;
        DirEnt *d = realloc(f->dirs, cap * sizeof(DirEnt));
        if (d == NULL)
            return -1;
        f->dirs = d;
        f->dcap = cap;
    }
    char *copy = malloc(n ? n : 1);
    if (copy == NULL)
        return -1;
    memcpy(copy, p, n);
    f->dirs[f->ndirs++] = (DirEnt){copy, n, h, fd};
    return 0;
}

static void
dirs_clear(Fast *f)
{
    for (size_t i = 0; i < f->ndirs; i++) {
        close(f->dirs[i].fd);
        free(f->dirs[i].path);
    }
    f->ndirs = 0;
}

/* drop cached directories at or below `p` */
static void
dirs_invalidate(Fast *f, const char *p, size_t n)
{
    size_t i = 0;
    while (i < f->ndirs) {
        DirEnt *e = &f->dirs[i];
        if (e->len >= n && memcmp(e->path, p, n) == 0 && (e->len == n || e->path[n] == '/')) {
            close(e->fd);
            free(e->path);
            f->dirs[i] = f->dirs[--f->ndirs];
        }
        else {
            i++;
        }
    }
}

/* descriptor of the directory `p` (n bytes, checked), walked without following links */
static int
dir_fd(Fast *f, const char *p, size_t n)
{
    if (n == 0)
        return f->root_fd;
    int fd = dir_lookup(f, p, n, hash_bytes(p, n));
    if (fd >= 0)
        return fd;
    /* the longest cached prefix is where the walk starts */
    size_t start = 0;
    int cur = f->root_fd;
    for (size_t cut = n; cut-- > 0;) {
        if (p[cut] != '/')
            continue;
        int c = dir_lookup(f, p, cut, hash_bytes(p, cut));
        if (c >= 0) {
            start = cut + 1;
            cur = c;
            break;
        }
    }
    /* only the deepest WALK_KEEP directories of the walk are cached (Sandbox.dir_fd) */
    size_t left = 1;
    for (const char *s = p + start; (s = memchr(s, '/', (size_t)(p + n - s))) != NULL; s++)
        left++;
    char name[NAME_MAX + 1];
    int loose = -1; /* an open directory on the way that is not kept */
    while (start < n) {
        const char *s = memchr(p + start, '/', n - start);
        size_t stop = s ? (size_t)(s - p) : n;
        size_t len = stop - start;
        if (len > NAME_MAX)
            goto fail;
        memcpy(name, p + start, len);
        name[len] = 0;
        int nfd = openat(cur, name, DIR_FLAGS);
        if (loose >= 0) {
            int e = errno;
            close(loose);
            errno = e;
            loose = -1;
        }
        if (nfd < 0)
            return -1;
        if (left-- > WALK_KEEP) {
            loose = nfd;
        }
        else if (dir_add(f, p, stop, hash_bytes(p, stop), nfd) < 0) {
            close(nfd);
            return -1;
        }
        cur = nfd;
        start = stop + 1;
    }
    return cur;
fail:
    if (loose >= 0)
        close(loose);
    return -1;
}

/* the last component of a checked path into `name` (NUL-terminated); the length of the
 * directory part before it (0: none), or -1 if the name is too long */
static long
split_last(const char *p, size_t n, char *name)
{
    const char *slash = memrchr(p, '/', n);
    const char *last = slash ? slash + 1 : p;
    size_t len = (size_t)(p + n - last);
    if (len > NAME_MAX)
        return -1;
    memcpy(name, last, len);
    name[len] = 0;
    return slash ? (long)(slash - p) : 0;
}

/* (directory descriptor, NUL-terminated last component) of a checked entry path */
static int
parent_of(Fast *f, const char *p, size_t n, char *name)
{
    long dlen = split_last(p, n, name);
    if (dlen < 0)
        return -1;
    return dlen ? dir_fd(f, p, (size_t)dlen) : f->root_fd;
}

/* an owned descriptor of the directory `p` (n bytes, checked, non-empty) below `root`,
 * walked one component at a time without following links */
static int
walk_dirs(int root, const char *p, size_t n)
{
    int cur = root;
    size_t start = 0;
    while (start < n) {
        const char *s = memchr(p + start, '/', n - start);
        size_t stop = s ? (size_t)(s - p) : n;
        char part[NAME_MAX + 1];
        int nfd = -1;
        if (stop - start <= NAME_MAX) {
            memcpy(part, p + start, stop - start);
            part[stop - start] = 0;
            nfd = openat(cur, part, DIR_FLAGS);
        }
        if (cur != root)
            close(cur);
        if (nfd < 0)
            return -1;
        cur = nfd;
        start = stop + 1;
    }
    return cur;
}

/* openat2(2) and fchmodat2(2) by number (glibc may lack their wrappers); -1 when the
 * kernel lacks them (ENOSYS: remembered), and the callers take the calls they stand for */
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
struct open_how_args {
    uint64_t flags, mode, resolve;
};
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define RESOLVE_BENEATH_ 0x08
static int no_openat2, no_fchmodat2;

/* the entry at the checked path `p` (n bytes, non-empty) below `root` opened with `flags`
 * in one system call: no symbolic link followed at any component, nothing outside `root`
 * reached (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), which is what a walk one
 * component at a time with O_NOFOLLOW gives. -1 with errno ENOSYS: no openat2 here */
static int
open_beneath(int root, const char *p, size_t n, int flags)
{
    char path[PATH_MAX];
    if (no_openat2) {
        errno = ENOSYS;
        return -1;
    }
    if (n >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(path, p, n);
    path[n] = 0;
    struct open_how_args how = {(uint64_t)flags, 0,
                                RESOLVE_BENEATH_ | RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_};
    long fd = syscall(SYS_openat2, root, path, &how, sizeof how);
    if (fd < 0 && (errno == ENOSYS || errno == E2BIG)) {
        no_openat2 = 1;
        errno = ENOSYS;
    }
    return (int)fd;
}

/* copy `p` (n bytes) into the growable buffer *buf (capacity *cap) */
static int
path_copy(char **buf, size_t *cap, const char *p, size_t n)
{
    if (n > *cap) {
        char *b = realloc(*buf, n);
        if (b == NULL)
            return -1;
        *buf = b;
        *cap = n;
    }
    memcpy(*buf, p, n);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * the write descriptor */

static void
held_close(Held *h)
{
    if (h->fd >= 0)
        close(h->fd);
    h->fd = -1;
    h->len = 0;
    h->pend = 0;
}

/* the held descriptor now stands for path `p` (n bytes) */
static int
held_path(Held *h, const char *p, size_t n)
{
    if (path_copy(&h->path, &h->cap, p, n) < 0)
        return -1;
    h->len = n;
    return 0;
}

/* hold `fd` (owned from now on: closed on failure) for path `p` */
static int
held_set(Held *h, int fd, const char *p, size_t n)
{
    held_close(h);
    if (held_path(h, p, n) < 0) {
        close(fd);
        return -1;
    }
    h->fd = fd;
    return 0;
}

static inline int
held_is(const Held *h, const char *p, size_t n)
{
    return h->fd >= 0 && h->len == n && memcmp(h->path, p, n) == 0;
}

/* an open regular file for writing (Sandbox.open_file), cached as the write descriptor */
static int
write_fd(Fast *f, const char *p, size_t n)
{
    if (held_is(&f->w, p, n))
        return f->w.fd;
    char name[NAME_MAX + 1];
    int dfd = parent_of(f, p, n, name);
    if (dfd < 0)
        return -1;
    int fd = -1;
    int pfd = openat(dfd, name, PATH_FLAGS);
    if (pfd >= 0) {
        struct stat st;
        if (fstat(pfd, &st) == 0 && S_ISREG(st.st_mode)) {
            char proc[64];
            snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
            fd = open(proc, O_WRONLY | O_CLOEXEC);
        }
        close(pfd);
    }
    if (fd < 0 || held_set(&f->w, fd, p, n) < 0)
        return -1;
    return fd;
}

/* ---------------------------------------------------------------------------------------
 * gathering: a record's fields into an Op, with the GIL held (a missing, mistyped or
 * out-of-range field, or a path that breaks the rules, hands the record to Python) */

/* one record to apply, its fields extracted; `kp`/`kq` keep the path bytes alive and `view`
 * pins the data of WRITE/ENCODED_WRITE while the GIL is released */
typedef struct Op {
    int op;
    const char *p, *q; /* PATH; PATH_TO / PATH_LINK / symlink target */
    size_t n, qn;
    long long v[5]; /* offset/size/mode/uid,gid/atime,mtime/encoded-write parameters */
    PyObject *kp, *kq;
    Py_buffer view;
} Op;

static int
get_bytes(PyObject *rec, PyObject *name, const char **p, size_t *n, PyObject **keep)
{
    PyObject *v = PyObject_GetAttr(rec, name);
    if (v == NULL)
        return -1;
    if (!PyBytes_Check(v)) {
        Py_DECREF(v);
        return -1;
    }
    *p = PyBytes_AS_STRING(v);
    *n = (size_t)PyBytes_GET_SIZE(v);
    *keep = v;
    return 0;
}

static int
get_i64(PyObject *rec, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(rec, name);
    if (v == NULL)
        return -1;
    int overflow = 0;
    long long x = PyLong_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : -1;
    int bad = !PyLong_Check(v) || overflow || (x == -1 && PyErr_Occurred());
    Py_DECREF(v);
    if (bad)
        return -1;
    *out = x;
    return 0;
}

/* a path field, checked (an empty one only where `root_ok`: the subvolume root) */
static int
get_path(PyObject *rec, PyObject *name, int root_ok, const char **p, size_t *n,
         PyObject **keep)
{
    if (get_bytes(rec, name, p, n, keep) < 0)
        return -1;
    if ((*n == 0 && root_ok) || check_path(*p, *n) == 0)
        return 0;
    Py_CLEAR(*keep);
    return -1;
}

static void
op_release(Op *o)
{
    Py_CLEAR(o->kp);
    Py_CLEAR(o->kq);
    if (o->view.obj != NULL)
        PyBuffer_Release(&o->view);
}

static int
get_data(PyObject *rec, Op *o)
{
    PyObject *data = PyObject_GetAttr(rec, s_data);
    if (data == NULL)
        return -1;
    int r = PyObject_GetBuffer(data, &o->view, PyBUF_SIMPLE);
    Py_DECREF(data);
    return r;
}

/* 0: `o` holds the record's fields; -1: Python applies it (o released) */
static int
gather(Fast *f, int op, PyObject *rec, Op *o)
{
    memset(o, 0, sizeof *o);
    o->op = op;
    long long *v = o->v;
    int root_ok = op == OP_CHMOD || op == OP_CHOWN || op == OP_UTIMES;
    if (get_path(rec, s_path, root_ok, &o->p, &o->n, &o->kp) < 0)
        return -1;
    switch (op) {
    case OP_SYMLINK:
        if (get_bytes(rec, s_target, &o->q, &o->qn, &o->kq) < 0 || o->qn == 0 ||
            memchr(o->q, 0, o->qn) != NULL)
            goto fail;
        break;
    case OP_RENAME:
    case OP_LINK:
        if (get_path(rec, op == OP_RENAME ? s_path_to : s_path_link, 0, &o->q, &o->qn,
                     &o->kq) < 0)
            goto fail;
        break;
    case OP_TRUNCATE:
        if (get_i64(rec, s_size, &v[0]) < 0 || v[0] < 0)
            goto fail;
        break;
    case OP_WRITE:
        if (get_i64(rec, s_offset, &v[0]) < 0 || v[0] < 0 || get_data(rec, o) < 0)
            goto fail;
        break;
    case OP_ENCODED_WRITE: {
        /* v: offset, unencoded file length, unencoded length and offset, compression */
        if (!f->encoded)
            goto fail;
        PyObject *e = PyObject_GetAttr(rec, s_encryption);
        if (e == NULL)
            goto fail;
        int plain = e == Py_None || (PyLong_Check(e) && PyLong_AsLongLong(e) == 0);
        Py_DECREF(e);
        if (!plain || get_i64(rec, s_offset, &v[0]) < 0 || v[0] < 0 ||
            get_i64(rec, s_unencoded_file_len, &v[1]) < 0 ||
            get_i64(rec, s_unencoded_len, &v[2]) < 0 ||
            get_i64(rec, s_unencoded_offset, &v[3]) < 0 ||
            get_i64(rec, s_compression, &v[4]) < 0)
            goto fail;
        if (v[4] < 1 || v[4] > COMPRESSION_MAX || v[2] < 0 || v[2] > MAX_UNENCODED || v[1] < 0 ||
            v[3] < 0 || v[3] + v[1] > v[2])
            goto fail;
        if (get_data(rec, o) < 0 || o->view.len == 0)
            goto fail;
        break;
    }
    case OP_CLONE: {
        /* v: offset, length, clone offset; only from the registered source subvolume */
        if (f->clone_fd < 0 || get_i64(rec, s_offset, &v[0]) < 0 || v[0] < 0 ||
            get_i64(rec, s_length, &v[1]) < 0 || v[1] <= 0 ||
            get_i64(rec, s_clone_offset, &v[2]) < 0 || v[2] < 0 ||
            get_path(rec, s_clone_path, 0, &o->q, &o->qn, &o->kq) < 0)
            goto fail;
        PyObject *u = PyObject_GetAttr(rec, s_clone_uuid);
        PyObject *ub = u ? PyObject_GetAttr(u, s_bytes) : NULL;
        Py_XDECREF(u);
        int same = ub != NULL && PyBytes_Check(ub) && PyBytes_GET_SIZE(ub) == 16 &&
                   memcmp(PyBytes_AS_STRING(ub), f->clone_uuid, 16) == 0;
        Py_XDECREF(ub);
        if (!same)
            goto fail;
        break;
    }
    case OP_CHMOD:
        if (get_i64(rec, s_mode, &v[0]) < 0)
            goto fail;
        break;
    case OP_CHOWN:
        if (get_i64(rec, s_uid, &v[0]) < 0 || get_i64(rec, s_gid, &v[1]) < 0 || v[0] < 0 ||
            v[1] < 0 || v[0] > UINT32_MAX || v[1] > UINT32_MAX)
            goto fail;
        break;
    case OP_UTIMES:
        if (get_i64(rec, s_atime, &v[0]) < 0 || get_i64(rec, s_mtime, &v[1]) < 0 ||
            v[0] < 0 || v[1] < 0)
            goto fail;
        break;
    default: /* MKFILE, MKDIR, UNLINK, RMDIR, UPDATE_EXTENT: the path is all */
        break;
    }
    return 0;
fail:
    op_release(o);
    return -1;
}

/* ---------------------------------------------------------------------------------------
 * executing: the system calls of one gathered record, with the GIL released (no Python
 * object is touched); 0 = applied, -1 = hand the record to Python (nothing of it applied) */

static int
exec_entry(Fast *f, const Op *o)
{
    const char *p = o->p;
    size_t n = o->n;
    char name[NAME_MAX + 1];
    if (o->op == OP_UNLINK && held_is(&f->w, p, n))
        held_close(&f->w);
    if (o->op == OP_RMDIR) {
        held_close(&f->w);
        dirs_invalidate(f, p, n);
        if (f->clone_fd == f->root_fd) /* the clone source is this subvolume */
            held_close(&f->src_dir);
        f->dirs_changed = 1;
    }
    int dfd = parent_of(f, p, n, name);
    if (dfd < 0)
        return -1;
    switch (o->op) {
    case OP_MKFILE: {
        int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        return fd < 0 || held_set(&f->w, fd, p, n) < 0 ? -1 : 0;
    }
    case OP_MKDIR:
        return mkdirat(dfd, name, 0700) < 0 ? -1 : 0;
    case OP_UNLINK:
        return unlinkat(dfd, name, 0) < 0 ? -1 : 0;
    case OP_RMDIR:
        return unlinkat(dfd, name, AT_REMOVEDIR) < 0 ? -1 : 0;
    case OP_SYMLINK: /* a bytes object's buffer ends with a NUL */
        return symlinkat(o->q, dfd, name) < 0 ? -1 : 0;
    default:
        return -1;
    }
}

/* RENAME and LINK: two paths */
static int
exec_two(Fast *f, const Op *o)
{
    const char *a = o->p, *b = o->q;
    size_t an = o->n, bn = o->qn;
    char aname[NAME_MAX + 1], bname[NAME_MAX + 1];
    int afd = parent_of(f, a, an, aname);
    if (afd < 0)
        return -1;
    int bfd = parent_of(f, b, bn, bname);
    if (bfd < 0)
        return -1;
    if (o->op == OP_LINK) /* new name `path` for the existing `path_link` */
        return linkat(bfd, bname, afd, aname, 0) < 0 ? -1 : 0;
    if (renameat(afd, aname, bfd, bname) < 0)
        return -1;
    dirs_invalidate(f, a, an);
    dirs_invalidate(f, b, bn);
    if (f->clone_fd == f->root_fd) /* the clone source is this subvolume */
        held_close(&f->src_dir);
    f->dirs_changed = 1;
    if (f->w.fd >= 0) { /* the cached descriptor follows its inode to the new name */
        const char *w = f->w.path;
        size_t wn = f->w.len;
        if (wn == an && memcmp(w, a, an) == 0) {
            if (held_path(&f->w, b, bn) < 0)
                held_close(&f->w);
        }
        else if (wn > an && memcmp(w, a, an) == 0 && w[an] == '/') {
            size_t rest = wn - an;
            char *nw = malloc(bn + rest);
            if (nw == NULL) {
                held_close(&f->w);
            }
            else {
                memcpy(nw, b, bn);
                memcpy(nw + bn, w + an, rest);
                if (held_path(&f->w, nw, bn + rest) < 0)
                    held_close(&f->w);
                free(nw);
            }
        }
        else if (wn >= bn && memcmp(w, b, bn) == 0 && (wn == bn || w[bn] == '/')) {
            held_close(&f->w);
        }
    }
    return 0;
}

/* write_behind(): once `behind` bytes were written into the file since its last one, the
 * write-out of the range they span is started (sync_file_range(SYNC_FILE_RANGE_WRITE):
 * data only, no transaction, no wait for the I/O), so that a large file goes to the disk
 * while the stream is still coming and a syncfs at the end finds little left to write.
 * A file smaller than that is left to the kernel's writeback. */
static void
written(Fast *f, long long off, long long len)
{
    Held *h = &f->w;
    if (h->pend == 0 || off < h->lo)
        h->lo = off;
    if (h->pend == 0 || off + len > h->hi)
        h->hi = off + len;
    h->pend += len;
    if (h->pend >= f->behind) {
        (void)sync_file_range(h->fd, h->lo, h->hi - h->lo, SYNC_FILE_RANGE_WRITE);
        h->pend = 0;
    }
}

/* WRITE, TRUNCATE, UPDATE_EXTENT, ENCODED_WRITE */
static int
exec_data(Fast *f, const Op *o, long long *nbytes)
{
    if (o->op == OP_UPDATE_EXTENT) /* a no-op, as in btrfs-progs */
        return 0;
    int fd = write_fd(f, o->p, o->n);
    if (fd < 0)
        return -1;
    const long long *v = o->v;
    if (o->op == OP_TRUNCATE)
        return ftruncate(fd, (off_t)v[0]) < 0 ? -1 : 0;
    if (o->op == OP_WRITE) {
        size_t done = 0, len = (size_t)o->view.len;
        const char *buf = o->view.buf;
        while (done < len) {
            ssize_t w = pwrite(fd, buf + done, len - done, (off_t)(v[0] + (long long)done));
            if (w <= 0)
                return -1;
            done += (size_t)w;
        }
        *nbytes += (long long)len;
        if (f->behind > 0)
            written(f, v[0], (long long)len);
        return 0;
    }
    struct iovec iov = {o->view.buf, (size_t)o->view.len};
    struct encoded_io_args args;
    memset(&args, 0, sizeof args);
    args.iov = &iov;
    args.iovcnt = 1;
    args.offset = v[0];
    args.len = (uint64_t)v[1];
    args.unencoded_len = (uint64_t)v[2];
    args.unencoded_offset = (uint64_t)v[3];
    args.compression = (uint32_t)v[4];
    if (ioctl(fd, IOC_ENCODED_WRITE, &args) < 0)
        return -1;
    *nbytes += v[1];
    return 0;
}

/* `n` zero bytes written at `off` (where a hole cannot be punched) */
static int
write_zeros(int fd, off_t off, off_t n)
{
    static const char zeros[65536];
    while (n > 0) {
        ssize_t w = pwrite(fd, zeros, (size_t)(n < (off_t)sizeof zeros ? n : (off_t)sizeof zeros),
                           off);
        if (w <= 0)
            return -1;
        off += w;
        n -= w;
    }
    return 0;
}

/* copy.copy_range in C: a byte range copied in the kernel one data segment at a time
 * (SEEK_DATA/SEEK_HOLE), the source's holes punched in the destination */
static int
copy_range(int src, off_t src_off, int dst, off_t dst_off, off_t length)
{
    off_t end = src_off + length, pos = src_off;
    while (pos < end) {
        off_t data = lseek(src, pos, SEEK_DATA);
        if (data < 0) {
            if (errno != ENXIO) /* ENXIO: only a hole up to EOF */
                return -1;
            data = end;
        }
        if (data > end)
            data = end;
        if (data > pos) { /* a hole in the source: make the destination range a hole too */
            off_t hole_dst = dst_off + (pos - src_off);
            struct stat st;
            if (fstat(dst, &st) < 0)
                return -1;
            if (hole_dst < st.st_size) {
                off_t n = data - pos < st.st_size - hole_dst ? data - pos : st.st_size - hole_dst;
                /* a hole up to the end is punched to the end of the block that holds it
                 * (copy._block_end): one that stops inside the block keeps the block */
                off_t blk = st.st_blksize > 0 ? (off_t)st.st_blksize : 1;
                off_t punch = hole_dst + n < st.st_size ? n
                              : (st.st_size + blk - 1) / blk * blk - hole_dst;
                if (fallocate(dst, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, hole_dst, punch) < 0 &&
                    write_zeros(dst, hole_dst, n) < 0)
                    return -1;
            }
            if (dst_off + (data - src_off) > st.st_size &&
                ftruncate(dst, dst_off + (data - src_off)) < 0)
                return -1;
            pos = data;
            if (pos >= end)
                break;
        }
        off_t hole = lseek(src, pos, SEEK_HOLE);
        if (hole < 0)
            return -1;
        if (hole > end)
            hole = end;
        while (pos < hole) {
            loff_t in = pos, out = dst_off + (pos - src_off);
            ssize_t n = copy_file_range(src, &in, dst, &out, (size_t)(hole - pos), 0);
            if (n < 0)
                return -1;
            if (n == 0)
                return 0;
            pos += n;
        }
    }
    return 0;
}

/* CLONE: FICLONERANGE from the file at the clone path of the source subvolume (walked
 * without following symlinks; the directory of the last one is kept open); where the file
 * system cannot reflink that range, a copy (as the Python handler does) */
static int
exec_clone(Fast *f, const Op *o)
{
    int dst = write_fd(f, o->p, o->n);
    if (dst < 0)
        return -1;
    /* O_NOATIME: a copy standing in for the reflink leaves the source's atime, as the
     * clone ioctl does (allowed to the owner or CAP_FOWNER; else opened without) */
    int flags = O_RDONLY | O_NOATIME | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK;
    /* one openat2 of the whole path (the source's directories neither walked nor held) */
    int src = open_beneath(f->clone_fd, o->q, o->qn, flags);
    if (src < 0 && errno == EPERM) {
        flags &= ~O_NOATIME;
        src = open_beneath(f->clone_fd, o->q, o->qn, flags);
    }
    if (src < 0 && errno == ENOSYS) {
        char name[NAME_MAX + 1];
        long dlen = split_last(o->q, o->qn, name);
        if (dlen < 0)
            return -1;
        int dfd = f->clone_fd;
        if (dlen > 0) {
            if (!held_is(&f->src_dir, o->q, (size_t)dlen)) {
                int fd = walk_dirs(f->clone_fd, o->q, (size_t)dlen);
                if (fd < 0 || held_set(&f->src_dir, fd, o->q, (size_t)dlen) < 0)
                    return -1;
            }
            dfd = f->src_dir.fd;
        }
        src = openat(dfd, name, flags);
        if (src < 0 && errno == EPERM && (flags & O_NOATIME))
            src = openat(dfd, name, flags & ~O_NOATIME);
    }
    if (src < 0)
        return -1;
    /* FICLONERANGE refuses a source that is not a regular file (EINVAL, EISDIR): the
     * file type is looked at (fstat) only before the copy that stands in for it. So is
     * the source's size: a range past its end is refused, as the ioctl and btrfs receive
     * refuse it (Python's handler, applying the record again, says so) */
    struct clone_range_args args = {src, (uint64_t)o->v[2], (uint64_t)o->v[1],
                                    (uint64_t)o->v[0]};
    int r = ioctl(dst, IOC_FICLONERANGE, &args);
    if (r < 0 && (errno == ENOTTY || errno == EINVAL || errno == ENOSPC ||
                  errno == EOPNOTSUPP || errno == EXDEV || errno == EPERM)) {
        struct stat st;
        uint64_t len = (uint64_t)o->v[1];
        if (fstat(src, &st) != 0 || !S_ISREG(st.st_mode))
            r = -1;
        else if (len > 0 && (len > (uint64_t)st.st_size ||
                             (uint64_t)o->v[2] > (uint64_t)st.st_size - len)) {
            errno = EINVAL;
            r = -1;
        } else
            r = copy_range(src, (off_t)o->v[2], dst, (off_t)o->v[0], (off_t)o->v[1]);
    }
    close(src);
    return r < 0 ? -1 : 0;
}

/* CHMOD, CHOWN, UTIMES: an empty path is the subvolume root */
static int
exec_meta(Fast *f, const Op *o)
{
    const char *p = o->p;
    size_t n = o->n;
    const long long *v = o->v;
    char name[NAME_MAX + 1];
    int dfd = f->root_fd;
    if (n != 0) {
        dfd = parent_of(f, p, n, name);
        if (dfd < 0)
            return -1;
    }
    int r;
    if (o->op == OP_CHMOD) {
        mode_t m = (mode_t)(v[0] & 07777);
        if (n == 0)
            return fchmod(f->root_fd, m) < 0 ? -1 : 0;
        if (held_is(&f->w, p, n)) /* the file just written: a regular file held open */
            return fchmod(f->w.fd, m) < 0 ? -1 : 0;
        /* fchmodat2 does not follow a final symbolic link (one system call); where the
         * kernel lacks it, or on a symbolic link (EOPNOTSUPP), the entry is opened with
         * O_PATH, looked at and changed through /proc/self/fd */
        if (!no_fchmodat2) {
            if (syscall(SYS_fchmodat2, dfd, name, m, AT_SYMLINK_NOFOLLOW) == 0)
                return 0;
            if (errno == ENOSYS)
                no_fchmodat2 = 1;
            else if (errno != EINVAL && errno != EOPNOTSUPP)
                return -1;
        }
        r = -1;
        int pfd = openat(dfd, name, PATH_FLAGS);
        if (pfd >= 0) {
            struct stat st;
            if (fstat(pfd, &st) == 0) {
                if (S_ISLNK(st.st_mode)) { /* symlinks have no mode on Linux */
                    r = 0;
                }
                else {
                    char proc[64];
                    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
                    r = chmod(proc, m);
                }
            }
            close(pfd);
        }
    }
    else if (o->op == OP_CHOWN) {
        if (n == 0)
            r = fchown(f->root_fd, (uid_t)v[0], (gid_t)v[1]);
        else
            r = fchownat(dfd, name, (uid_t)v[0], (gid_t)v[1], AT_SYMLINK_NOFOLLOW);
    }
    else {
        struct timespec ts[2] = {{(time_t)(v[0] / 1000000000), (long)(v[0] % 1000000000)},
                                 {(time_t)(v[1] / 1000000000), (long)(v[1] % 1000000000)}};
        if (n == 0)
            r = futimens(f->root_fd, ts);
        else
            r = utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW);
    }
    return r < 0 ? -1 : 0;
}

static int
exec_op(Fast *f, const Op *o, long long *nbytes)
{
    if (f->ndirs > DIRS_TRIM)
        dirs_clear(f);
    switch (o->op) {
    case OP_RENAME:
    case OP_LINK:
        return exec_two(f, o);
    case OP_WRITE:
    case OP_TRUNCATE:
    case OP_UPDATE_EXTENT:
    case OP_ENCODED_WRITE:
        return exec_data(f, o, nbytes);
    case OP_CHMOD:
    case OP_CHOWN:
    case OP_UTIMES:
        return exec_meta(f, o);
    case OP_CLONE:
        return exec_clone(f, o);
    default:
        return exec_entry(f, o);
    }
}

/* ---------------------------------------------------------------------------------------
 * the Fast type */

static int
Fast_init(Fast *self, PyObject *args, PyObject *kwds)
{
    self->root_fd = -1;
    self->w.fd = -1;
    self->clone_fd = -1;
    self->src_dir.fd = -1;
    return 0;
}

static void
Fast_release(Fast *self)
{
    held_close(&self->w);
    dirs_clear(self);
    held_close(&self->src_dir);
    self->clone_fd = -1;
}

static void
progress_release(Fast *self)
{
    if (self->progress != NULL) {
        self->progress = NULL;
        PyBuffer_Release(&self->progress_view);
    }
}

static void
Fast_dealloc(Fast *self)
{
    Fast_release(self);
    progress_release(self);
    free(self->dirs);
    free(self->w.path);
    free(self->ops);
    free(self->src_dir.path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Fast_reset(Fast *self, PyObject *args)
{
    int root_fd, encoded;
    if (!PyArg_ParseTuple(args, "ip:reset", &root_fd, &encoded))
        return NULL;
    Fast_release(self);
    self->root_fd = root_fd;
    self->encoded = encoded;
    self->dirs_changed = 0;
    Py_RETURN_NONE;
}

static PyObject *
Fast_run(Fast *self, PyObject *args)
{
    PyObject *batch;
    Py_ssize_t start;
    unsigned long long base = 0;
    if (!PyArg_ParseTuple(args, "O!n|K:run", &PyList_Type, &batch, &start, &base))
        return NULL;
    Py_ssize_t i = start < 0 ? 0 : start;
    Py_ssize_t size = PyList_GET_SIZE(batch);
    long long nbytes = 0;
    if (self->root_fd < 0 || i >= size)
        return Py_BuildValue("nL", i, nbytes);
    if ((size_t)(size - i) > self->ocap) {
        Op *ops = realloc(self->ops, (size_t)(size - i) * sizeof(Op));
        if (ops == NULL)
            return PyErr_NoMemory();
        self->ops = ops;
        self->ocap = (size_t)(size - i);
    }
    /* gather with the GIL: up to the first record Python must apply */
    Py_ssize_t count = 0;
    for (Py_ssize_t j = i; j < size; j++, count++) {
        PyTypeObject *t = Py_TYPE(PyList_GET_ITEM(batch, j));
        int op = 0;
        while (op < NOPS && op_types[op] != t)
            op++;
        if (op == NOPS)
            break;
        if (gather(self, op, PyList_GET_ITEM(batch, j), &self->ops[count]) < 0) {
            PyErr_Clear(); /* Python applies this record and reports its own error */
            break;
        }
    }
    /* apply without the GIL, once for the run: a reader thread runs meanwhile */
    Py_ssize_t done = 0;
    volatile uint64_t *progress = self->progress;
    Py_BEGIN_ALLOW_THREADS
    while (done < count && exec_op(self, &self->ops[done], &nbytes) == 0) {
        done++;
        if (progress != NULL)
            *progress = base + (uint64_t)done;
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < count; k++)
        op_release(&self->ops[k]);
    return Py_BuildValue("nL", i + done, nbytes);
}

static PyObject *
Fast_set_clone_source(Fast *self, PyObject *args)
{
    const char *u;
    Py_ssize_t n;
    int fd;
    if (!PyArg_ParseTuple(args, "y#i:set_clone_source", &u, &n, &fd))
        return NULL;
    if (n != 16) {
        PyErr_SetString(PyExc_ValueError, "set_clone_source() needs a 16-byte uuid");
        return NULL;
    }
    held_close(&self->src_dir);
    memcpy(self->clone_uuid, u, 16);
    self->clone_fd = fd;
    Py_RETURN_NONE;
}

static PyObject *
Fast_take_write(Fast *self, PyObject *unused)
{
    if (self->w.fd < 0)
        Py_RETURN_NONE;
    PyObject *r = Py_BuildValue("(y#i)", self->w.path, (Py_ssize_t)self->w.len, self->w.fd);
    if (r != NULL) {
        self->w.fd = -1;
        self->w.len = 0;
        self->w.pend = 0;
    }
    return r;
}

static PyObject *
Fast_give_write(Fast *self, PyObject *args)
{
    const char *p;
    Py_ssize_t n;
    int fd;
    if (!PyArg_ParseTuple(args, "y#i:give_write", &p, &n, &fd))
        return NULL;
    if (held_set(&self->w, fd, p, (size_t)n) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *
Fast_track(Fast *self, PyObject *arg)
{
    progress_release(self);
    if (arg == Py_None)
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(arg, &self->progress_view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (self->progress_view.len < 8 || ((uintptr_t)self->progress_view.buf & 7)) {
        PyBuffer_Release(&self->progress_view);
        PyErr_SetString(PyExc_ValueError, "track() needs an aligned writable buffer of 8 bytes");
        return NULL;
    }
    self->progress = (volatile uint64_t *)self->progress_view.buf;
    Py_RETURN_NONE;
}

static PyObject *
Fast_write_behind(Fast *self, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    self->behind = n < 0 ? 0 : n;
    Py_RETURN_NONE;
}

static PyObject *
Fast_clear_dirs(Fast *self, PyObject *unused)
{
    dirs_clear(self);
    held_close(&self->src_dir);
    Py_RETURN_NONE;
}

static PyObject *
Fast_take_dirs_changed(Fast *self, PyObject *unused)
{
    int c = self->dirs_changed;
    self->dirs_changed = 0;
    return PyBool_FromLong(c);
}

static PyObject *
Fast_close(Fast *self, PyObject *unused)
{
    Fast_release(self);
    self->root_fd = -1;
    Py_RETURN_NONE;
}

static PyMethodDef Fast_methods[] = {
    {"reset", (PyCFunction)Fast_reset, METH_VARARGS,
     "reset(root_fd, encoded): start on a subvolume root (-1: none); drop all state."},
    {"run", (PyCFunction)Fast_run, METH_VARARGS,
     "run(batch, start, base=0) -> (stop, data_bytes): apply batch[start:] until a record "
     "that Python must apply; stop is its index. With track(), base + the records applied "
     "so far is stored after each one."},
    {"track", (PyCFunction)Fast_track, METH_O,
     "track(buffer | None): store the count of records applied in the first 8 bytes of "
     "this writable buffer (native u64) after each record run() applies."},
    {"set_clone_source", (PyCFunction)Fast_set_clone_source, METH_VARARGS,
     "set_clone_source(uuid_bytes, root_fd): CLONE records from this subvolume (its root "
     "descriptor is borrowed) are applied here; reset() forgets it."},
    {"take_write", (PyCFunction)Fast_take_write, METH_NOARGS,
     "take_write() -> (path, fd) | None: hand the cached write descriptor to the caller."},
    {"give_write", (PyCFunction)Fast_give_write, METH_VARARGS,
     "give_write(path, fd): take ownership of the caller's write descriptor for path."},
    {"write_behind", (PyCFunction)Fast_write_behind, METH_O,
     "write_behind(nbytes): start the write-out of a file's data (sync_file_range) each "
     "time nbytes more were written into it (0: never, the default)."},
    {"clear_dirs", (PyCFunction)Fast_clear_dirs, METH_NOARGS,
     "clear_dirs(): forget cached directories (after Python renamed or removed some)."},
    {"take_dirs_changed", (PyCFunction)Fast_take_dirs_changed, METH_NOARGS,
     "take_dirs_changed() -> bool: did C rename or remove entries since the last call."},
    {"close", (PyCFunction)Fast_close, METH_NOARGS, "close(): release every descriptor."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "btrdelta.receive._fastapply.Fast",
    .tp_basicsize = sizeof(Fast),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "C state of the fast apply path: a subvolume root, cached directories and "
              "one write descriptor.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Fast_init,
    .tp_dealloc = (destructor)Fast_dealloc,
    .tp_methods = Fast_methods,
};

/* configure(types): the record classes in OP order */
static PyObject *
configure(PyObject *self, PyObject *arg)
{
    if (!PyTuple_Check(arg) || PyTuple_GET_SIZE(arg) != NOPS) {
        PyErr_Format(PyExc_TypeError, "configure() needs a tuple of %d record classes", NOPS);
        return NULL;
    }
    for (int i = 0; i < NOPS; i++) {
        PyObject *t = PyTuple_GET_ITEM(arg, i);
        if (!PyType_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "configure() needs record classes");
            return NULL;
        }
        Py_INCREF(t);
        Py_XDECREF(op_types[i]);
        op_types[i] = (PyTypeObject *)t;
    }
    Py_RETURN_NONE;
}

/* fall_back(flag): with a true flag, take the calls of kernels without openat2 and
 * fchmodat2 (as after their ENOSYS), so that tests reach them on any kernel; a false one
 * tries the newer calls again */
static PyObject *
fall_back(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    no_openat2 = no_fchmodat2 = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fall_back", fall_back, METH_O,
     "fall_back(flag): use the calls of kernels without openat2 / fchmodat2 (tests)."},
    {"configure", configure, METH_O,
     "configure(types): the record classes of MKFILE, MKDIR, SYMLINK, RENAME, LINK, UNLINK, "
     "RMDIR, WRITE, TRUNCATE, CHMOD, CHOWN, UTIMES, UPDATE_EXTENT, ENCODED_WRITE, CLONE."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastapply",
    "Optional C fast path of the receive applier (see _fastapply.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastapply(void)
{
#define I(var, text)                                                                          \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                     \
    return NULL
    I(s_path, "path");
    I(s_path_to, "path_to");
    I(s_path_link, "path_link");
    I(s_target, "target");
    I(s_data, "data");
    I(s_offset, "offset");
    I(s_size, "size");
    I(s_mode, "mode");
    I(s_uid, "uid");
    I(s_gid, "gid");
    I(s_atime, "atime");
    I(s_mtime, "mtime");
    I(s_unencoded_file_len, "unencoded_file_len");
    I(s_unencoded_len, "unencoded_len");
    I(s_unencoded_offset, "unencoded_offset");
    I(s_compression, "compression");
    I(s_encryption, "encryption");
    I(s_length, "length");
    I(s_clone_path, "clone_path");
    I(s_clone_offset, "clone_offset");
    I(s_clone_uuid, "clone_uuid");
    I(s_bytes, "bytes");
#undef I
    if (PyType_Ready(&FastType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastType);
    if (PyModule_AddObject(m, "Fast", (PyObject *)&FastType) < 0) {
        Py_DECREF(&FastType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/*
 * btrdelta.tree._treewalk: the walk of an incremental tree-sum (tree/incremental.py), in C.
 *
 * derive(root, parent_root, parent, hold, hold_tree) walks the tree at root in the order of
 * treesum._walk (a directory's entries sorted by name, then each subdirectory's contents in
 * that order; entries on another device and btrfs's empty-subvolume stubs skipped), lstat()
 * of every entry relative to its directory's descriptor, and returns a list of
 * (relative path, key, got) in that order; key is the tuple incremental._key makes
 * (inode, size, mtime ns, ctime ns, mode, uid, gid, link count) and got says what the
 * parent's digests (parent: relative path -> (Entry, key), the tree at parent_root
 * hashed earlier) give for the entry:
 *
 *   - the parent's Entry itself: same path, same key (ctime included: the very inode,
 *     untouched since it was hashed), one link or a directory;
 *   - a new Entry, the parent's restated (see restate(): the same instance fields, mode,
 *     uid, gid and mtime from this lstat, extra empty, and its manifest line made here):
 *     a regular file, directory or symlink at the same path with the same inode
 *     number (a btrfs snapshot keeps them), one link in both trees (a file: the same size),
 *     whose parent entry still has the inode, size, mtime and ctime it was hashed with
 *     (fstatat() in the parent tree): content digest, symlink target and extended
 *     attributes are the parent's, and mode, uid, gid, mtime and size are this lstat's
 *     (the parent's line with those fields written again);
 *   - None: anything else (a path in hold or below a path of hold_tree: the stream wrote
 *     it or changed names there; other kinds, hard links, no parent entry): the caller
 *     works it out (incremental.Changes.tree_sum, the reference, which handles every
 *     entry this way when this module is not built).
 *
 * derive(root, parent_root, parent, hold, hold_tree, out, keys, on_held) returns None and
 * gives the same as it goes: got appended to out and keys[rel] = key for each entry
 * the parent gives, on_held(rel) called for each entry handed back (incremental.py makes
 * those while the walk's thread lstat()s the entries that follow).
 *
 * derive(..., on_held, proven), proven a set: the parent's entries are not looked at
 * (no fstatat() in parent_root); "still has the inode, size, mtime and ctime it was
 * hashed with" is rel in proven, the set unchanged(parent_root, parent) gave when it
 * was called after the snapshot of parent_root was made (incremental.Changes.start, before
 * the seal: the walk after the seal makes half the system calls).
 *
 * Two threads: phase 1, the walk itself (readdir(), every lstat() and the parent's, no
 * Python object), runs in a thread of its own (walk_tree) that hands its nodes over every
 * PUBLISH_EVERY of them, while the calling thread, holding the GIL, makes each node's
 * (rel, key, got) as they come (phase 2, derive_all). On numpy's hop the two were 4.4 and
 * 2.9 ms of CPU one after the other; overlapped, the check took 7.4-8.2 ms instead of
 * 10.4-10.7 (idle cores; session 13), for 0.5-1 ms more CPU (the hand-overs). The result
 * is the same list in the same order.
 *
 * Raises OSError where treesum._walk would (a directory that cannot be listed, an entry
 * gone between listing and lstat).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <pthread.h>
#include <unistd.h>

#include "_constants.h"

/* What the walk keeps of an entry's lstat (the key's fields), and of the parent's entry. */
typedef struct {
    unsigned long long ino, nlink;
    long long size, mtime, ctime;
    unsigned mode, uid, gid;
} Lstat;

typedef struct {
    unsigned long long ino;
    long long size, mtime, ctime;
    unsigned mode;
} Stamp;

static long long ns(const struct timespec *t) {
    return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static void keep(Lstat *out, const struct stat *st) {
    out->ino = st->st_ino;
    out->nlink = st->st_nlink;
    out->size = st->st_size;
    out->mtime = ns(&st->st_mtim);
    out->ctime = ns(&st->st_ctim);
    out->mode = st->st_mode;
    out->uid = st->st_uid;
    out->gid = st->st_gid;
}

static void stamp_of(Stamp *out, const struct stat *st) {
    out->ino = st->st_ino;
    out->size = st->st_size;
    out->mtime = ns(&st->st_mtim);
    out->ctime = ns(&st->st_ctim);
    out->mode = st->st_mode;
}

typedef struct {
    PyObject *parent;    /* dict: rel -> (Entry, key) */
    PyObject *hold;      /* set of rel */
    PyObject *hold_tree; /* set of rel (and everything below) */
    PyObject *out;       /* list of (rel, key, got); with on_held, of got */
    PyObject *keys;      /* with on_held: dict rel -> key of each got */
    PyObject *on_held;   /* NULL, or called with the rel of each entry handed back */
    PyObject *record;    /* "record" */
    struct Scan *scan;   /* phase 1's nodes, made by walk_tree() (no Python objects) */
    const char *root, *proot;
    PyObject *proven;    /* NULL, or the set unchanged() gave: no fstatat() in the parent */
} Walk;

/* Names of the Entry fields a restated entry gets (restate()), interned once. */
static PyObject *f_mode, *f_uid, *f_gid, *f_mtime, *f_extra, *f_record, *f_dict, *no_args;

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static PyObject *make_key(const Lstat *st) {
    return Py_BuildValue("(KLLLIIIK)", st->ino, st->size, st->mtime, st->ctime, st->mode,
                         st->uid, st->gid, st->nlink);
}

static int key_at(PyObject *key, Py_ssize_t i, long long *out) {
    PyObject *v = PyTuple_GET_ITEM(key, i);
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

/* Whether a token of a manifest line is one of the fields taken from the lstat. */
static int stat_field(const char *t, Py_ssize_t n) {
    static const char *names[] = {"mode=", "uid=", "gid=", "mtime=", "size="};
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        size_t len = strlen(names[k]);
        if ((size_t)n >= len && memcmp(t, names[k], len) == 0)
            return 1;
    }
    return 0;
}

/* The manifest line of the entry: the parent's line with mode, uid, gid, mtime (and for a
 * file, size) from st. NULL with an exception set on failure; Py_None (new reference) when
 * the parent's line does not have the expected shape. */
static PyObject *derived_line(PyObject *line, const Lstat *st, int is_file) {
    const char *s = PyBytes_AS_STRING(line);
    Py_ssize_t n = PyBytes_GET_SIZE(line), i = 0, tok = 0, head = -1;
    /* the path and kind tokens, then the stat fields; the rest is kept */
    while (i < n) {
        Py_ssize_t j = i;
        while (j < n && s[j] != ' ' && s[j] != '\n')
            j++;
        if (tok == 2 && head < 0)
            head = i - 1; /* the space before the third token */
        if (tok >= 2 && !stat_field(s + i, j - i))
            break;
        tok++;
        i = j;
        if (i < n && s[i] == ' ')
            i++;
        else
            break;
    }
    if (head < 0 || tok < 2)
        Py_RETURN_NONE;
    /* i: start of the first kept token, or the newline */
    Py_ssize_t tail = i;
    if (tail > 0 && s[tail - 1] == ' ')
        tail--; /* keep the space before the kept token */
    char fields[160];
    int len;
    if (is_file)
        len = snprintf(fields, sizeof fields, " mode=%o uid=%u gid=%u mtime=%lld size=%lld",
                       st->mode, st->uid, st->gid, st->mtime, st->size);
    else
        len = snprintf(fields, sizeof fields, " mode=%o uid=%u gid=%u mtime=%lld", st->mode,
                       st->uid, st->gid, st->mtime);
    if (len < 0 || (size_t)len >= sizeof fields)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, head + len + (n - tail));
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    memcpy(o, s, head);
    memcpy(o + head, fields, len);
    memcpy(o + head + len, s + tail, n - tail);
    return out;
}

/* The parent's entry restated (a new reference, NULL with an exception): a new instance of
 * entry's class (object.__new__, no __init__) whose __dict__ is a copy of entry's (src) with
 * mode, uid, gid and mtime_ns from key (incremental's lstat key), extra a new empty dict
 * and the memoized manifest line _record (Entry.record) set: what dataclasses.replace()
 * would give, without formatting the line again. */
static PyObject *restate(PyObject *entry, PyObject *src, PyObject *key, PyObject *line) {
    PyObject *new = PyBaseObject_Type.tp_new(Py_TYPE(entry), no_args, NULL);
    if (new == NULL)
        return NULL;
    PyObject *dst = PyDict_Copy(src);
    PyObject *extra = dst == NULL ? NULL : PyDict_New();
    int ok = extra != NULL &&
             PyDict_SetItem(dst, f_mode, PyTuple_GET_ITEM(key, 4)) == 0 &&
             PyDict_SetItem(dst, f_uid, PyTuple_GET_ITEM(key, 5)) == 0 &&
             PyDict_SetItem(dst, f_gid, PyTuple_GET_ITEM(key, 6)) == 0 &&
             PyDict_SetItem(dst, f_mtime, PyTuple_GET_ITEM(key, 2)) == 0 &&
             PyDict_SetItem(dst, f_extra, extra) == 0 &&
             PyDict_SetItem(dst, f_record, line) == 0 &&
             /* (as object.__setattr__(new, "__dict__", dst): CPython 3.13.0's
              * PyObject_GenericSetDict swaps the dict of an object with inline values
              * but leaves those valid, and every field was then missing: AttributeError
              * 'path' on each restated entry) */
             PyObject_GenericSetAttr(new, f_dict, dst) == 0;
    Py_XDECREF(extra);
    Py_XDECREF(dst);
    if (!ok)
        Py_CLEAR(new);
    return new;
}

static int contains(PyObject *set, PyObject *rel) {
    return set == Py_None ? 0 : PySet_Contains(set, rel);
}

/* What the parent gives for one entry (see the file comment): a new reference to the
 * parent's Entry, a bytes line or None; NULL with an exception. */
static PyObject *lookup_in(Walk *w, PyObject *entry, PyObject *pkey, const Lstat *st,
                           PyObject *key, const Stamp *pst, int proven);

static PyObject *lookup(Walk *w, PyObject *rel, const Lstat *st, PyObject *key,
                        const Stamp *pst) {
    int proven = w->proven == NULL ? -1 : PySet_Contains(w->proven, rel);
    if (proven == -1 && w->proven != NULL)
        return NULL;
    PyObject *found = PyDict_GetItemWithError(w->parent, rel);
    if (found == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2)
        Py_RETURN_NONE;
    Py_INCREF(found); /* (borrowed from the dict; held while its items are used) */
    PyObject *out = lookup_in(w, PyTuple_GET_ITEM(found, 0), PyTuple_GET_ITEM(found, 1), st,
                              key, pst, proven);
    Py_DECREF(found);
    return out;
}

static PyObject *lookup_in(Walk *w, PyObject *entry, PyObject *pkey, const Lstat *st,
                           PyObject *key, const Stamp *pst, int proven) {
    if (!PyTuple_Check(pkey) || PyTuple_GET_SIZE(pkey) != 8)
        Py_RETURN_NONE;
    int is_dir = S_ISDIR(st->mode), is_file = S_ISREG(st->mode);
    int eq = PyObject_RichCompareBool(pkey, key, Py_EQ);
    if (eq < 0)
        return NULL;
    if (eq && (st->nlink == 1 || is_dir)) {
        Py_INCREF(entry);
        return entry;
    }
    if (!is_dir && !is_file && !S_ISLNK(st->mode))
        Py_RETURN_NONE;
    long long ino, size, mtime, ctime, mode, nlink;
    if (key_at(pkey, 0, &ino) || key_at(pkey, 1, &size) || key_at(pkey, 2, &mtime) ||
        key_at(pkey, 3, &ctime) || key_at(pkey, 4, &mode) || key_at(pkey, 7, &nlink))
        return NULL;
    if ((unsigned long long)ino != st->ino || ((unsigned)mode & S_IFMT) != (st->mode & S_IFMT))
        Py_RETURN_NONE;
    if (!is_dir && (st->nlink != 1 || nlink != 1))
        Py_RETURN_NONE;
    if (is_file && size != st->size)
        Py_RETURN_NONE;
    /* the parent's entry as it was hashed: inode, size, mtime, ctime (seen by unchanged()
     * after the snapshot was made, or by phase 1) */
    if (proven == 0)
        Py_RETURN_NONE;
    if (proven < 0 && (pst == NULL || pst->ino != (unsigned long long)ino ||
                       pst->size != size || pst->mtime != mtime || pst->ctime != ctime))
        Py_RETURN_NONE;
    /* the line memoized in the entry's __dict__ (Entry.record made it), else made now */
    PyObject *src = PyObject_GenericGetDict(entry, NULL);
    if (src == NULL)
        return NULL;
    PyObject *line = PyDict_GetItemWithError(src, f_record);
    if (line != NULL)
        Py_INCREF(line);
    else if (!PyErr_Occurred())
        line = PyObject_GetAttr(entry, w->record);
    PyObject *out = line == NULL           ? NULL
                    : !PyBytes_Check(line) ? Py_NewRef(Py_None)
                                           : derived_line(line, st, is_file);
    Py_XDECREF(line);
    PyObject *restated = out == NULL || out == Py_None ? out : restate(entry, src, key, out);
    if (restated != out)
        Py_DECREF(out);
    Py_DECREF(src);
    return restated;
}

/* ---- phase 1, without the GIL: every entry's lstat (and its parent's), in walk order ---- */

typedef struct {
    char *rel;  /* relative path (malloc), "." for the root */
    size_t len;
    size_t up;  /* index of the directory it is in (the root: itself) */
    Lstat st;
    Stamp pst;  /* the entry at the same path in the parent tree */
    int has_pst;
} Node;

/* Nodes are kept in chunks that never move: the main thread reads the first `ready` of
 * them (phase 2) while the walk's thread adds more. */
#define CHUNK_BITS 10
#define CHUNK ((size_t)1 << CHUNK_BITS)
#define MAX_CHUNKS 16384 /* 16.7 M entries */
#define PUBLISH_EVERY 64 /* nodes added between two wake-ups of the main thread */

typedef struct Scan {
    Node *chunks[MAX_CHUNKS];
    size_t count;     /* nodes added (the walk's thread only) */
    dev_t dev;
    int err;          /* errno of the first failure */
    char *err_name;   /* the name it failed on (malloc) */
    /* between the walk's thread and the main thread, under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t ready;     /* nodes complete: the main thread may read them */
    int done, rc;     /* the walk ended, and how (scan_dir's return) */
    size_t told;      /* `ready` at the last wake-up */
} Scan;

static Node *node_at(Scan *sc, size_t i) {
    return &sc->chunks[i >> CHUNK_BITS][i & (CHUNK - 1)];
}

static Node *add_node(Scan *sc) {
    size_t c = sc->count >> CHUNK_BITS;
    if ((sc->count & (CHUNK - 1)) == 0) {
        if (c >= MAX_CHUNKS || (sc->chunks[c] = malloc(CHUNK * sizeof(Node))) == NULL)
            return NULL;
    }
    Node *n = node_at(sc, sc->count++);
    memset(n, 0, sizeof *n);
    return n;
}

/* Every node added so far is complete: let the main thread have them (every
 * PUBLISH_EVERY nodes, or now with `now`). */
static void publish(Scan *sc, int now) {
    if (!now && sc->count - sc->told < PUBLISH_EVERY)
        return;
    pthread_mutex_lock(&sc->mu);
    sc->ready = sc->told = sc->count;
    pthread_cond_signal(&sc->cv);
    pthread_mutex_unlock(&sc->mu);
}

static int fail(Scan *sc, int err, const char *name) {
    if (!sc->err) {
        sc->err = err ? err : EIO;
        sc->err_name = name ? strdup(name) : NULL;
    }
    return -1;
}

static int is_empty_dir(int fd) {
    DIR *probe = fdopendir(dup(fd));
    int empty = 1;
    if (probe == NULL)
        return 0;
    struct dirent *e;
    while ((e = readdir(probe)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            empty = 0;
            break;
        }
    closedir(probe);
    return empty;
}

/* The entries of directory fd (node index `self`), then each subdirectory's; pdir: the
 * same directory in the parent tree (-1: none). Closes fd and pdir. A subdirectory is
 * opened when its turn comes: two descriptors per level of depth are open at a time. */
static int scan_dir(Scan *sc, int fd, size_t self, int pdir) {
    int rc = -1;
    DIR *d = fdopendir(fd);
    char **names = NULL;
    size_t count = 0, cap = 0, nsubs = 0;
    struct sub {
        size_t name, node;
    } *subs = NULL;
    if (d == NULL) {
        fail(sc, errno, node_at(sc, self)->rel);
        close(fd);
        goto done;
    }
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (e == NULL) {
            if (errno) {
                fail(sc, errno, node_at(sc, self)->rel);
                goto done;
            }
            break;
        }
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 64;
            char **more = realloc(names, cap * sizeof *names);
            if (more == NULL) {
                fail(sc, ENOMEM, NULL);
                goto done;
            }
            names = more;
        }
        if ((names[count] = strdup(e->d_name)) == NULL) {
            fail(sc, ENOMEM, NULL);
            goto done;
        }
        count++;
    }
    qsort(names, count, sizeof *names, cmp_names);
    subs = malloc((count ? count : 1) * sizeof *subs);
    if (subs == NULL) {
        fail(sc, ENOMEM, NULL);
        goto done;
    }
    int dfd = dirfd(d);
    for (size_t k = 0; k < count; k++) {
        const char *name = names[k];
        struct stat st;
        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            fail(sc, errno, name);
            goto done;
        }
        if (st.st_dev != sc->dev)
            continue; /* another subvolume / mount */
        if (S_ISDIR(st.st_mode) && st.st_ino == 2) { /* btrfs empty-subvolume stub? */
            int sub = openat(dfd, name, DIR_FLAGS);
            if (sub < 0) {
                fail(sc, errno, name);
                goto done;
            }
            int empty = is_empty_dir(sub);
            close(sub);
            if (empty)
                continue;
        }
        /* (nodes may move: index, not pointer) */
        size_t plen = self == 0 ? 0 : node_at(sc, self)->len, nlen = strlen(name);
        char *rel = malloc(plen + (plen ? 1 : 0) + nlen + 1);
        Node *n = rel == NULL ? NULL : add_node(sc);
        if (n == NULL) {
            free(rel);
            fail(sc, ENOMEM, NULL);
            goto done;
        }
        if (plen) {
            memcpy(rel, node_at(sc, self)->rel, plen);
            rel[plen] = '/';
        }
        memcpy(rel + plen + (plen ? 1 : 0), name, nlen + 1);
        n->rel = rel;
        n->len = plen + (plen ? 1 : 0) + nlen;
        n->up = self;
        keep(&n->st, &st);
        struct stat pst;
        n->has_pst = pdir >= 0 && fstatat(pdir, name, &pst, AT_SYMLINK_NOFOLLOW) == 0;
        if (n->has_pst)
            stamp_of(&n->pst, &pst);
        if (S_ISDIR(st.st_mode)) {
            subs[nsubs].name = k;
            subs[nsubs].node = sc->count - 1;
            nsubs++;
        }
        publish(sc, 0);
    }
    rc = 0;
    for (size_t j = 0; j < nsubs && rc == 0; j++) {
        const char *name = names[subs[j].name];
        const Node *n = node_at(sc, subs[j].node);
        int sub = openat(dfd, name, DIR_FLAGS);
        if (sub < 0) {
            rc = fail(sc, errno, name);
            break;
        }
        int spdir = pdir >= 0 && n->has_pst && S_ISDIR(n->pst.mode)
                        ? openat(pdir, name, DIR_FLAGS)
                        : -1;
        rc = scan_dir(sc, sub, subs[j].node, spdir);
    }
    nsubs = 0;
done:
    free(subs);
    if (names != NULL) {
        for (size_t j = 0; j < count; j++)
            free(names[j]);
        free(names);
    }
    if (d != NULL)
        closedir(d);
    if (pdir >= 0)
        close(pdir);
    return rc;
}

static void free_scan(Scan *sc) {
    for (size_t i = 0; i < sc->count; i++)
        free(node_at(sc, i)->rel);
    for (size_t c = 0; c < MAX_CHUNKS && sc->chunks[c] != NULL; c++)
        free(sc->chunks[c]);
    free(sc->err_name);
    pthread_cond_destroy(&sc->cv);
    pthread_mutex_destroy(&sc->mu);
    free(sc);
}

/* Phase 1 (see the file comment), then `done` told to the main thread. */
static void *walk_tree(void *arg) {
    Walk *w = arg;
    Scan *sc = w->scan;
    int rc = -1;
    int fd = open(w->root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    Node *top = NULL;
    struct stat st, pst;
    if (fd < 0)
        fail(sc, errno, w->root);
    else if ((top = add_node(sc)) == NULL || (top->rel = strdup(".")) == NULL) {
        fail(sc, ENOMEM, NULL);
        close(fd);
    } else if (fstat(fd, &st) != 0) {
        fail(sc, errno, w->root);
        close(fd);
    } else {
        top->len = 1;
        keep(&top->st, &st);
        sc->dev = st.st_dev;
        int pdir = w->proven != NULL ? -1 : open(w->proot, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        top->has_pst = pdir >= 0 && fstat(pdir, &pst) == 0;
        if (top->has_pst)
            stamp_of(&top->pst, &pst);
        rc = scan_dir(sc, fd, 0, pdir);
    }
    pthread_mutex_lock(&sc->mu);
    sc->ready = sc->count;
    sc->done = 1;
    sc->rc = rc;
    pthread_cond_signal(&sc->cv);
    pthread_mutex_unlock(&sc->mu);
    return NULL;
}

/* ---- phase 2, with the GIL: what the parent's digests give each entry ---- */

/* The (rel, key, got) of node i appended to w->out; held[i] set. 0, or -1 with an
 * exception. */
static int derive_one(Walk *w, size_t i, char *held) {
    const Node *n = node_at(w->scan, i);
    PyObject *rel = PyBytes_FromStringAndSize(n->rel, (Py_ssize_t)n->len);
    if (rel == NULL)
        return -1;
    int h = i ? held[n->up] : 0;
    if (!h)
        h = contains(w->hold_tree, rel);
    PyObject *key = h < 0 ? NULL : make_key(&n->st);
    int exact = h ? h : (key == NULL ? -1 : contains(w->hold, rel));
    PyObject *got = exact < 0 ? NULL
                    : exact   ? Py_NewRef(Py_None)
                              : lookup(w, rel, &n->st, key, n->has_pst ? &n->pst : NULL);
    int r = got == NULL ? -1 : 0;
    if (r == 0 && w->on_held == NULL) {
        PyObject *item = PyTuple_Pack(3, rel, key, got);
        r = item == NULL ? -1 : PyList_Append(w->out, item);
        Py_XDECREF(item);
    } else if (r == 0 && got == Py_None) {
        PyObject *ret = PyObject_CallOneArg(w->on_held, rel);
        r = ret == NULL ? -1 : 0;
        Py_XDECREF(ret);
    } else if (r == 0) {
        r = PyDict_SetItem(w->keys, rel, key) == 0 ? PyList_Append(w->out, got) : -1;
    }
    Py_DECREF(rel);
    Py_XDECREF(key);
    Py_XDECREF(got);
    held[i] = (char)(h > 0);
    return r;
}

/* Phase 2 of every node as phase 1 (its own thread, started here; inline if it cannot
 * start) makes them: the two overlap. 0 (the walk ended; sc->rc says how), or -1 with an
 * exception (the walk's thread joined). */
static int derive_all(Walk *w) {
    Scan *sc = w->scan;
    pthread_t thread;
    int threaded = pthread_create(&thread, NULL, walk_tree, w) == 0;
    if (!threaded) {
        Py_BEGIN_ALLOW_THREADS
        walk_tree(w);
        Py_END_ALLOW_THREADS
    }
    size_t i = 0, cap = 0, ready = 0;
    int done = 0, failed = 0;
    char *held = NULL;
    while (!done || i < ready) {
        if (i == ready) {
            Py_BEGIN_ALLOW_THREADS
            pthread_mutex_lock(&sc->mu);
            while (sc->ready == i && !sc->done)
                pthread_cond_wait(&sc->cv, &sc->mu);
            ready = sc->ready;
            done = sc->done;
            pthread_mutex_unlock(&sc->mu);
            Py_END_ALLOW_THREADS
        }
        if (failed || (done && sc->rc)) {
            i = ready; /* the rest is not looked at: the walk goes on to its end */
            continue;
        }
        if (ready > cap) {
            char *more = realloc(held, ready);
            if (more == NULL) {
                PyErr_NoMemory();
                failed = 1;
                continue;
            }
            held = more;
            cap = ready;
        }
        for (; i < ready && !failed; i++)
            failed = derive_one(w, i, held) != 0;
    }
    if (threaded) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(thread, NULL);
        Py_END_ALLOW_THREADS
    }
    free(held);
    return failed ? -1 : 0;
}

static PyObject *derive(PyObject *self, PyObject *args) {
    const char *root, *proot;
    PyObject *parent, *hold, *hold_tree, *out = NULL, *keys = NULL, *on_held = NULL;
    PyObject *proven = Py_None;
    if (!PyArg_ParseTuple(args, "yyO!OO|O!O!OO", &root, &proot, &PyDict_Type, &parent, &hold,
                          &hold_tree, &PyList_Type, &out, &PyDict_Type, &keys, &on_held,
                          &proven))
        return NULL;
    if (proven != Py_None && !PyAnySet_Check(proven)) {
        PyErr_SetString(PyExc_TypeError, "proven must be a set or None");
        return NULL;
    }
    if ((hold != Py_None && !PyAnySet_Check(hold)) ||
        (hold_tree != Py_None && !PyAnySet_Check(hold_tree))) {
        PyErr_SetString(PyExc_TypeError, "hold and hold_tree must be sets or None");
        return NULL;
    }
    if ((out != NULL) != (on_held != NULL) || (on_held != NULL && !PyCallable_Check(on_held))) {
        PyErr_SetString(PyExc_TypeError, "out, keys and a callable on_held go together");
        return NULL;
    }
    Scan *sc = calloc(1, sizeof *sc);
    if (sc == NULL)
        return PyErr_NoMemory();
    pthread_mutex_init(&sc->mu, NULL);
    pthread_cond_init(&sc->cv, NULL);
    Walk w = {parent, hold, hold_tree, out != NULL ? Py_NewRef(out) : PyList_New(0), keys,
              on_held, PyUnicode_FromString("record"), sc, root, proot,
              proven == Py_None ? NULL : proven};
    if (w.out == NULL || w.record == NULL || derive_all(&w) != 0)
        goto fail;
    if (sc->rc) {
        if (sc->err == ENOMEM)
            PyErr_NoMemory();
        else {
            errno = sc->err;
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, sc->err_name);
        }
        goto fail;
    }
    free_scan(sc);
    Py_DECREF(w.record);
    if (on_held == NULL)
        return w.out;
    Py_DECREF(w.out);
    Py_RETURN_NONE;
fail:
    free_scan(sc);
    Py_XDECREF(w.out);
    Py_XDECREF(w.record);
    return NULL;
}

/* ---- unchanged(): the parent's stamps, looked at before the check ---- */

typedef struct {
    const char *name; /* the last component of rel (in the bytes object held) */
    Py_ssize_t up;    /* index of the entry of its directory, -1: the root's, -2: none */
    Stamp want;       /* inode, size, mtime, ctime it was hashed with */
    int fd;           /* a directory's, opened when an entry in it is looked at (-1: none) */
    int same;
} Look;

/* The directory descriptor entry i is looked up in (opened on first use, as phase 1 opens
 * them: no symlink followed), or -1. */
static int dir_of(Look *look, Py_ssize_t i, int root) {
    Py_ssize_t up = look[i].up;
    if (up == -1)
        return root;
    if (up < 0)
        return -1;
    if (look[up].fd == -2) {
        int in = dir_of(look, up, root);
        look[up].fd = in < 0 ? -1 : openat(in, look[up].name, DIR_FLAGS);
    }
    return look[up].fd;
}

/* Fill look[0..n) from the parent's digests (rel -> (Entry, key)); rels[i] holds each
 * rel. 0, or -1 with an exception. */
static int look_at(PyObject *parent, PyObject **rels, Look *look, Py_ssize_t n) {
    PyObject *index = PyDict_New(), *rel, *value;
    Py_ssize_t pos = 0, i = 0;
    int rc = index == NULL ? -1 : 0;
    while (rc == 0 && i < n && PyDict_Next(parent, &pos, &rel, &value)) {
        Look *l = &look[i];
        long long v[4] = {0, 0, 0, 0};
        l->fd = -2;
        l->up = -2;
        rels[i++] = Py_NewRef(rel);
        if (!PyBytes_Check(rel) || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2)
            continue;
        PyObject *key = PyTuple_GET_ITEM(value, 1);
        if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 8)
            continue;
        for (int k = 0; k < 4 && rc == 0; k++)
            rc = key_at(key, k, &v[k]);
        PyObject *at = rc ? NULL : PyLong_FromSsize_t(i - 1);
        rc = at == NULL ? -1 : PyDict_SetItem(index, rel, at);
        Py_XDECREF(at);
        if (rc)
            break;
        l->want = (Stamp){(unsigned long long)v[0], v[1], v[2], v[3], 0};
        const char *path = PyBytes_AS_STRING(rel), *slash = strrchr(path, '/');
        l->name = slash ? slash + 1 : path;
        if (slash == NULL) {
            l->up = -1;
            continue;
        }
        PyObject *dir = PyBytes_FromStringAndSize(path, slash - path);
        PyObject *found = dir == NULL ? NULL : PyDict_GetItemWithError(index, dir);
        Py_XDECREF(dir);
        if (found != NULL)
            l->up = PyLong_AsSsize_t(found);
        else if (PyErr_Occurred())
            rc = -1;
    }
    Py_XDECREF(index);
    return rc;
}

/* unchanged(parent_root, parent) -> set of the rels of parent (rel -> (Entry, key)) whose
 * entry under parent_root has the inode, size, mtime and ctime it was hashed with now
 * (fstatat() in its directory, opened without following symlinks; a directory before its
 * entries, as the walk lists them). Called after a snapshot of parent_root was made, it
 * tells what phase 1's fstatat() in the parent tells (ctimes only go forward: unchanged
 * now is unchanged since the hashing, the snapshot included): derive(..., proven) then
 * makes none, so the check's walk after the seal has half the lstat()s. */
static PyObject *unchanged(PyObject *self, PyObject *args) {
    const char *proot;
    PyObject *parent;
    if (!PyArg_ParseTuple(args, "yO!", &proot, &PyDict_Type, &parent))
        return NULL;
    Py_ssize_t n = PyDict_GET_SIZE(parent), got = 0;
    PyObject **rels = calloc(n ? n : 1, sizeof *rels);
    Look *look = calloc(n ? n : 1, sizeof *look);
    PyObject *out = rels && look ? PySet_New(NULL) : PyErr_NoMemory();
    if (out != NULL && look_at(parent, rels, look, n) != 0)
        Py_CLEAR(out);
    for (Py_ssize_t i = 0; rels != NULL && i < n && rels[i] != NULL; i++)
        got = i + 1;
    if (out != NULL) {
        Py_BEGIN_ALLOW_THREADS
        int root = open(proot, DIR_FLAGS);
        for (Py_ssize_t i = 0; i < got && root >= 0; i++) {
            struct stat st;
            int in = look[i].up == -2 ? -1 : dir_of(look, i, root);
            Stamp *w = &look[i].want;
            look[i].same = in >= 0 && fstatat(in, look[i].name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                           st.st_ino == w->ino && st.st_size == w->size &&
                           ns(&st.st_mtim) == w->mtime && ns(&st.st_ctim) == w->ctime;
        }
        for (Py_ssize_t i = 0; i < got; i++)
            if (look[i].fd >= 0)
                close(look[i].fd);
        if (root >= 0)
            close(root);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++) {
        if (out != NULL && look[i].same && PySet_Add(out, rels[i]) != 0)
            Py_CLEAR(out);
        Py_DECREF(rels[i]);
    }
    free(rels);
    free(look);
    return out;
}

static PyMethodDef methods[] = {
    {"derive", derive, METH_VARARGS,
     "derive(root, parent_root, parent, hold, hold_tree) -> [(rel, key, got)]: the walk "
     "of an incremental tree-sum (see the module's C source). derive(..., out, keys, "
     "on_held) -> None: each got appended to out, its key in keys[rel], on_held(rel) "
     "called for each entry handed back, in walk order; derive(..., on_held, proven): "
     "the parent's stamps are not looked at, proven (unchanged()'s) tells them."},
    {"unchanged", unchanged, METH_VARARGS,
     "unchanged(parent_root, parent) -> set of the rels of parent whose entry has the "
     "stamp it was hashed with now (see the module's C source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.tree._treewalk",
    "The walk of an incremental tree-sum in C (see tree/incremental.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__treewalk(void) {
    if (f_mode == NULL) {
        f_mode = PyUnicode_InternFromString("mode");
        f_uid = PyUnicode_InternFromString("uid");
        f_gid = PyUnicode_InternFromString("gid");
        f_mtime = PyUnicode_InternFromString("mtime_ns");
        f_extra = PyUnicode_InternFromString("extra");
        f_record = PyUnicode_InternFromString("_record");
        f_dict = PyUnicode_InternFromString("__dict__");
        no_args = PyTuple_New(0);
        if (f_mode == NULL || f_uid == NULL || f_gid == NULL || f_mtime == NULL ||
            f_extra == NULL || f_record == NULL || f_dict == NULL || no_args == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}

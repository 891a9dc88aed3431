/*
 * btrdelta.fs._sweep: the inode items of one change-sweep result buffer, in C.
 *
 * btrdelta.fs.btrfs.changed_inodes sweeps a subvolume's tree with TREE_SEARCH_V2 and
 * min_transid: the kernel returns every item of every leaf written since (a small
 * incremental of a 6,000-file tree: ~9,600 items for ~110 changed inodes), and the inode
 * items among them name the inodes written since. fs/sweepref.py walks the items in Python
 * (the reference, used when this module is not built: ~1,700 instructions an item, 16.7 M
 * for that sweep); this module walks a whole buffer in one call.
 *
 * inodes(buf, pos, nr_items, key_type, since, out, written=None) -> (objectid, type, offset):
 *   buf holds nr_items search results from offset pos, each a 32-byte header (u64 transid,
 *   objectid, offset, u32 type, len; little-endian, struct btrfs_ioctl_search_header) and
 *   len bytes of item. For each item of type key_type of at least 80 bytes (an inode item
 *   starts with u64 generation, transid; its u64 sequence, the inode's i_version, is at
 *   byte 72) whose transid is greater than since, out[objectid] = (generation, transid,
 *   sequence). With the set written, the objectid of each file extent item (EXTENT_DATA) whose
 *   generation (its first u64) is greater than since is added to it: the file's data was
 *   written since (a write through a mapping need not move the sequence). Returns the
 *   key of the last item (where the next search resumes). An item that runs past the
 *   buffer is a ValueError.
 *
 * extents(buf, pos, nr_items, ino) -> (items, offset, end):
 *   the file extent items (EXTENT_DATA) of inode ino among the nr_items results in buf
 *   from pos, packed as btrdelta.fs.btrfs.EXTENT (50 bytes: u64 key offset, num_bytes,
 *   disk_bytenr, disk_num_bytes, offset, generation; u8 type, compression), or None for
 *   items when one cannot be compared (shorter than a regular extent's 53 bytes,
 *   encrypted or otherwise encoded, a type other than regular or prealloc: inline data);
 *   offset: the key offset of the last result; end: where the results end. The reference
 *   is sweepref.extents (~1 us an item in Python: a 100 GiB image in 4 KiB extents has
 *   26 M). An item that runs past the buffer is a ValueError.
 *
 * search(fd, request, buf) -> None:
 *   ioctl(fd, request, buf) on the writable buffer buf (a TREE_SEARCH_V2 argument and its
 *   result space), the GIL released while the kernel searches: Python 3.11's fcntl.ioctl
 *   keeps the GIL during an ioctl whose mutable buffer exceeds 1 KiB, so a sweep in one
 *   thread (~2.5 ms of the kernel walking the tree) stopped every other thread. A bytearray
 *   cannot be resized while its buffer is held here. Retried on EINTR; another failure is
 *   an OSError with the errno, as fcntl.ioctl raises.
 *
 * fs_type(fd) -> int:
 *   fstatfs(fd)'s f_type (libc.fs_type). renameat2(olddirfd, old, newdirfd, new, flags) ->
 *   int: renameat2(2), 0 or the errno (libc.rename_noreplace, rename_exchange). Both are
 *   here so that a receive, which calls both (is DEST on btrfs; the subvolume's final
 *   name), does not import ctypes for them: 1.3-1.7 ms of its start, against ~0.2 ms to
 *   load this module.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "_constants.h"

#define HEADER 32 /* sizeof(struct btrfs_ioctl_search_header) */
#define EXTENT_DATA 108 /* BTRFS_EXTENT_DATA_KEY */

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static PyObject *inodes(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, nr;
    unsigned int key_type;
    unsigned long long since;
    PyObject *out, *written = Py_None;
    if (!PyArg_ParseTuple(args, "y*nnIKO!|O", &buf, &pos, &nr, &key_type, &since, &PyDict_Type,
                          &out, &written))
        return NULL;
    if (written != Py_None && !PySet_Check(written)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_TypeError, "written must be a set or None");
        return NULL;
    }
    const uint8_t *p = buf.buf;
    Py_ssize_t len = buf.len;
    uint64_t obj = 0, off = 0;
    uint32_t typ = 0;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < nr; i++) {
        if (pos < 0 || pos > len - HEADER) {
            PyErr_SetString(PyExc_ValueError, "a search result runs past the buffer");
            goto done;
        }
        const uint8_t *h = p + pos;
        obj = le64(h + 8);
        off = le64(h + 16);
        typ = le32(h + 24);
        uint32_t length = le32(h + 28);
        if ((Py_ssize_t)length > len - pos - HEADER) {
            PyErr_SetString(PyExc_ValueError, "a search result runs past the buffer");
            goto done;
        }
        if (typ == key_type && length >= 80) {
            uint64_t generation = le64(h + HEADER), transid = le64(h + HEADER + 8);
            if (transid > since) {
                PyObject *key = PyLong_FromUnsignedLongLong(obj);
                PyObject *value = key == NULL ? NULL : Py_BuildValue("(KKK)",
                    (unsigned long long)generation, (unsigned long long)transid,
                    (unsigned long long)le64(h + HEADER + 72));
                int bad = value == NULL || PyDict_SetItem(out, key, value) < 0;
                Py_XDECREF(key);
                Py_XDECREF(value);
                if (bad)
                    goto done;
            }
        } else if (typ == EXTENT_DATA && written != Py_None && length >= 8
                   && le64(h + HEADER) > since) {
            PyObject *key = PyLong_FromUnsignedLongLong(obj);
            int bad = key == NULL || PySet_Add(written, key) < 0;
            Py_XDECREF(key);
            if (bad)
                goto done;
        }
        pos += HEADER + (Py_ssize_t)length;
    }
    result = Py_BuildValue("(KIK)", (unsigned long long)obj, (unsigned int)typ,
                           (unsigned long long)off);
done:
    PyBuffer_Release(&buf);
    return result;
}

#define FE_HEAD 21 /* generation, ram_bytes, compression, encryption, other_encoding, type */
#define FE_SIZE 53 /* and disk_bytenr, disk_num_bytes, offset, num_bytes */
#define ITEM 50

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static PyObject *extents(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, nr;
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "y*nnK", &buf, &pos, &nr, &ino))
        return NULL;
    const uint8_t *p = buf.buf;
    Py_ssize_t len = buf.len;
    PyObject *result = NULL, *items = NULL;
    if (nr < 0) {
        PyErr_SetString(PyExc_ValueError, "a search result runs past the buffer");
        goto done;
    }
    /* (each result takes a header at least: no more fit; made in place, then cut) */
    Py_ssize_t most = nr < len / HEADER ? nr : len / HEADER;
    items = PyBytes_FromStringAndSize(NULL, most * ITEM);
    if (items == NULL)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(items);
    Py_ssize_t n = 0;
    uint64_t off = 0;
    int bad = 0;
    for (Py_ssize_t i = 0; i < nr; i++) {
        if (pos < 0 || pos > len - HEADER) {
            PyErr_SetString(PyExc_ValueError, "a search result runs past the buffer");
            goto done;
        }
        const uint8_t *h = p + pos;
        uint64_t obj = le64(h + 8);
        off = le64(h + 16);
        uint32_t typ = le32(h + 24), length = le32(h + 28);
        pos += HEADER;
        if ((Py_ssize_t)length > len - pos) {
            PyErr_SetString(PyExc_ValueError, "a search result runs past the buffer");
            goto done;
        }
        if (obj == ino && typ == EXTENT_DATA) {
            const uint8_t *fe = p + pos;
            uint8_t kind = length >= FE_HEAD ? fe[20] : 0;
            if (length < FE_SIZE || fe[17] || fe[18] || fe[19] || (kind != 1 && kind != 2)) {
                bad = 1;
                pos += length;
                break;
            }
            uint8_t *o = out + n * ITEM;
            put64(o, off);
            put64(o + 8, le64(fe + FE_HEAD + 24));
            put64(o + 16, le64(fe + FE_HEAD));
            put64(o + 24, le64(fe + FE_HEAD + 8));
            put64(o + 32, le64(fe + FE_HEAD + 16));
            put64(o + 40, le64(fe));
            o[48] = kind;
            o[49] = fe[16];
            n++;
        }
        pos += length;
    }
    if (bad)
        result = Py_BuildValue("(OKn)", Py_None, (unsigned long long)off, pos);
    else if (_PyBytes_Resize(&items, n * ITEM) == 0)
        result = Py_BuildValue("(OKn)", items, (unsigned long long)off, pos);
done:
    Py_XDECREF(items);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *search(PyObject *self, PyObject *args) {
    int fd;
    unsigned long request;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "ikw*", &fd, &request, &buf))
        return NULL;
    int ret, err;
    do {
        Py_BEGIN_ALLOW_THREADS
        ret = ioctl(fd, request, buf.buf);
        err = errno;
        Py_END_ALLOW_THREADS
    } while (ret == -1 && err == EINTR && PyErr_CheckSignals() == 0);
    PyBuffer_Release(&buf);
    if (ret == -1) {
        if (!PyErr_Occurred()) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *fs_type(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    struct statfs st;
    if (fstatfs(fd, &st) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong((long long)st.f_type);
}

static PyObject *renameat2_(PyObject *self, PyObject *args) {
    int olddir, newdir;
    const char *old, *new;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "iyiyI", &olddir, &old, &newdir, &new, &flags))
        return NULL;
    long r;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_renameat2, olddir, old, newdir, new, flags);
    if (r != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

static PyMethodDef methods[] = {
    {"fs_type", fs_type, METH_VARARGS, "fs_type(fd) -> fstatfs(fd).f_type."},
    {"renameat2", renameat2_, METH_VARARGS,
     "renameat2(olddirfd, old, newdirfd, new, flags) -> 0 or the errno."},
    {"search", search, METH_VARARGS,
     "search(fd, request, buf): ioctl(fd, request, buf) on a writable buffer, the GIL "
     "released."},
    {"extents", extents, METH_VARARGS,
     "extents(buf, pos, nr_items, ino) -> (items or None, key offset of the last result, "
     "end): the file extent items of inode ino among the results, packed."},
    {"inodes", inodes, METH_VARARGS,
     "inodes(buf, pos, nr_items, key_type, since, out, written=None) -> the key of the last "
     "item; out[objectid] = (generation, transid, sequence) for each inode item written "
     "after since; written: the objectids of file extent items written after since."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "btrdelta.fs._sweep",
    "The inode items of a change sweep's TREE_SEARCH_V2 results (btrdelta.fs.btrfs).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__sweep(void) { return PyModule_Create(&module); }

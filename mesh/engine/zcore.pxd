# C for mesh/engine/zcore.py in the compiled build (Cython, pure-Python mode): libzmq
# called through function pointers that the .py resolves at run time from the libzmq
# pyzmq loaded (never linked at build time: pip builds in an isolated environment).

cimport cython

cdef extern from *:
    """
    #include <errno.h>
    #include <pthread.h>
    #include <stddef.h>
    #include <string.h>
    #include <time.h>

    /* libzmq 4.x's ABI: zmq_msg_t is 64 opaque bytes, pointer-aligned; a poll item
       is (socket, fd, events, revents) on POSIX. */
    typedef struct { unsigned char _[64]; } __attribute__((aligned(sizeof(void *)))) zc_msg_t;
    typedef struct { void *socket; int fd; short events; short revents; } zc_pollitem_t;

    #define ZC_DONTWAIT 1
    #define ZC_SNDMORE 2
    #define ZC_POLLIN 1
    /* Messages read per call without the GIL, frames per call (ZC_PARTS per message
       at most: identity, riding credit, header, descriptor, data and one more), and
       the size from which a frame is kept as it is (a Frame), not copied to bytes:
       common.ZERO_COPY_BYTES, pyzmq's own threshold. */
    #define ZC_BATCH 64
    #define ZC_SLOTS 128
    #define ZC_PARTS 6
    #define ZC_ZERO_COPY 65536

    static int (*zc_msg_init)(zc_msg_t *);
    static int (*zc_msg_recv)(zc_msg_t *, void *, int);
    static int (*zc_msg_close)(zc_msg_t *);
    static int (*zc_msg_move)(zc_msg_t *, zc_msg_t *);
    static void *(*zc_msg_data)(zc_msg_t *);
    static size_t (*zc_msg_size)(const zc_msg_t *);
    static int (*zc_msg_more)(const zc_msg_t *);
    static int (*zc_poll)(zc_pollitem_t *, int, long);
    static int (*zc_send)(void *, const void *, size_t, int);
    static int (*zc_msg_init_data)(zc_msg_t *, void *, size_t, void (*)(void *, void *), void *);
    static int (*zc_msg_send)(zc_msg_t *, void *, int);
    static int (*zc_errno)(void);
    static int zc_bound = 0;

    static PyObject *zc_frame_bytes(zc_msg_t *msg) {
        return PyBytes_FromStringAndSize((const char *)zc_msg_data(msg),
                                         (Py_ssize_t)zc_msg_size(msg));
    }

    /* A received frame kept as it is (no copy): it owns its zmq_msg_t, closed when the
       last reference (a memoryview, a numpy array on it) goes. Shaped like the
       zmq.Frame the handling code reads: len(), .bytes (a copy), .buffer (a writable
       memoryview, as pyzmq's), .more (False: the message was read whole). */
    typedef struct {
        PyObject_HEAD
        zc_msg_t msg;
        char *data;
        Py_ssize_t size;
    } zc_frame;

    static void zc_frame_dealloc(PyObject *self) {
        zc_msg_close(&((zc_frame *)self)->msg);
        Py_TYPE(self)->tp_free(self);
    }

    static int zc_frame_getbuffer(PyObject *self, Py_buffer *view, int flags) {
        zc_frame *f = (zc_frame *)self;
        return PyBuffer_FillInfo(view, self, f->data, f->size, 0, flags);
    }

    static Py_ssize_t zc_frame_len(PyObject *self) { return ((zc_frame *)self)->size; }

    static PyObject *zc_frame_get_bytes(PyObject *self, void *closure) {
        zc_frame *f = (zc_frame *)self;
        return PyBytes_FromStringAndSize(f->data, f->size);
    }

    static PyObject *zc_frame_get_buffer(PyObject *self, void *closure) {
        return PyMemoryView_FromObject(self);
    }

    static PyObject *zc_frame_get_more(PyObject *self, void *closure) { Py_RETURN_FALSE; }

    static PyBufferProcs zc_frame_as_buffer = {zc_frame_getbuffer, NULL};
    static PySequenceMethods zc_frame_as_sequence = {zc_frame_len};
    static PyGetSetDef zc_frame_getset[] = {
        {"bytes", zc_frame_get_bytes, NULL, "the frame's bytes (a copy)", NULL},
        {"buffer", zc_frame_get_buffer, NULL, "a memoryview on the frame (no copy)", NULL},
        {"more", zc_frame_get_more, NULL, "always False: read whole", NULL},
        {NULL}
    };
    static PyTypeObject zc_frame_type = {
        PyVarObject_HEAD_INIT(NULL, 0)
        .tp_name = "mesh.engine.zcore.Frame",
        .tp_basicsize = sizeof(zc_frame),
        .tp_dealloc = zc_frame_dealloc,
        .tp_as_sequence = &zc_frame_as_sequence,
        .tp_as_buffer = &zc_frame_as_buffer,
        .tp_flags = Py_TPFLAGS_DEFAULT,
        .tp_doc = "A received zmq frame kept without a copy (engine/zcore.py).",
        .tp_getset = zc_frame_getset,
    };
    static int zc_frame_ready = 0;

    /* The Frame type (a new reference), readied on first use; NULL with an error set. */
    static PyObject *zc_frame_class(void) {
        if (!zc_frame_ready) {
            if (PyType_Ready(&zc_frame_type) < 0) return NULL;
            zc_frame_ready = 1;
        }
        Py_INCREF((PyObject *)&zc_frame_type);
        return (PyObject *)&zc_frame_type;
    }

    /* The address of a Frame's bytes (0 for anything else): engine/heap.py's Ballast. */
    static size_t zc_frame_address(PyObject *obj) {
        if (!zc_frame_ready || Py_TYPE(obj) != &zc_frame_type) return 0;
        return (size_t)((zc_frame *)obj)->data;
    }

    /* The addresses of the twelve functions above, in that order (Python ints). */
    static int zc_bind(PyObject *addresses) {
        void **slots[12] = {(void **)&zc_msg_init, (void **)&zc_msg_recv,
                            (void **)&zc_msg_close, (void **)&zc_msg_move,
                            (void **)&zc_msg_data, (void **)&zc_msg_size,
                            (void **)&zc_msg_more, (void **)&zc_poll, (void **)&zc_send,
                            (void **)&zc_errno, (void **)&zc_msg_init_data,
                            (void **)&zc_msg_send};
        if (!PyTuple_Check(addresses) || PyTuple_GET_SIZE(addresses) != 12) return 0;
        if (zc_frame_class() == NULL) { PyErr_Clear(); return 0; }
        Py_DECREF((PyObject *)&zc_frame_type);
        for (int i = 0; i < 12; i++) {
            void *p = PyLong_AsVoidPtr(PyTuple_GET_ITEM(addresses, i));
            if (p == NULL) { PyErr_Clear(); return 0; }
            *slots[i] = p;
        }
        zc_bound = 1;
        return 1;
    }

    /* A frame as Python: bytes (a copy) when small, else a Frame that takes over the
       message (msg is left empty: closing it is still right). */
    static PyObject *zc_frame_object(zc_msg_t *msg) {
        size_t size = zc_msg_size(msg);
        if (size < ZC_ZERO_COPY || !zc_frame_ready) return zc_frame_bytes(msg);
        zc_frame *f = PyObject_New(zc_frame, &zc_frame_type);
        if (f == NULL) return NULL;
        zc_msg_init(&f->msg);
        if (zc_msg_move(&f->msg, msg) < 0) {
            /* never for a valid message; keep the copy instead */
            Py_DECREF((PyObject *)f);
            return zc_frame_bytes(msg);
        }
        f->data = (char *)zc_msg_data(&f->msg);
        f->size = (Py_ssize_t)zc_msg_size(&f->msg);
        return (PyObject *)f;
    }

    /* Read what the socket has, waiting up to timeout_ms for it (0: not at all; -1:
       forever), without the GIL; then, with it, return (messages, status): each
       message a tuple of its frames (up to ZC_PARTS; bytes, or a Frame from
       ZC_ZERO_COPY bytes on: a 1 MiB array is not copied), status 0 when the socket
       had no more, 1 when ZC_BATCH messages (or ZC_SLOTS frames) were read (more
       may wait), 2 when the last message has more frames than ZC_PARTS (the caller
       reads the rest before anything else), or -errno (ETERM: the context ends;
       ENOTSOCK: the socket is closed). EINTR ends the wait with what was read. */
    static PyObject *zc_drain(PyObject *handle, long timeout_ms) {
        zc_msg_t msgs[ZC_SLOTS];
        int parts[ZC_BATCH];
        int n = 0, used = 0, status = 0, waited = (timeout_ms == 0);
        void *sock;
        if (!zc_bound) {
            PyErr_SetString(PyExc_RuntimeError, "zcore.drain before zcore.available()");
            return NULL;
        }
        sock = PyLong_AsVoidPtr(handle);
        if (sock == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null socket");
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            zc_msg_t *first = &msgs[used];
            if (n == ZC_BATCH || used + ZC_PARTS > ZC_SLOTS) { status = 1; break; }
            zc_msg_init(first);
            if (zc_msg_recv(first, sock, ZC_DONTWAIT) < 0) {
                int err = zc_errno();
                zc_msg_close(first);
                if (err == EAGAIN && !n && !waited) {
                    zc_pollitem_t item = {sock, 0, ZC_POLLIN, 0};
                    waited = 1;
                    if (zc_poll(&item, 1, timeout_ms) < 0) {
                        err = zc_errno();
                        status = err == EINTR ? 0 : -err;
                        break;
                    }
                    if (item.revents & ZC_POLLIN) continue;
                    break;
                }
                status = (err == EAGAIN || err == EINTR) ? 0 : -err;
                break;
            }
            int k = 1;
            /* The rest of a message is there at once (libzmq delivers whole ones). */
            while (zc_msg_more(&msgs[used + k - 1])) {
                if (k == ZC_PARTS) { status = 2; break; }
                zc_msg_t *next = &msgs[used + k];
                zc_msg_init(next);
                if (zc_msg_recv(next, sock, ZC_DONTWAIT) < 0) {
                    status = -zc_errno();
                    zc_msg_close(next);
                    break;
                }
                k++;
            }
            parts[n] = k;
            used += k;
            n++;
            if (status) break;
        }
        Py_END_ALLOW_THREADS
        PyObject *out = PyList_New(n);
        int failed = out == NULL;
        used = 0;
        for (int i = 0; i < n; i++) {
            PyObject *msg = NULL;
            if (!failed) {
                msg = PyTuple_New(parts[i]);
                failed = msg == NULL;
            }
            for (int j = 0; j < parts[i]; j++) {
                if (!failed) {
                    PyObject *frame = zc_frame_object(&msgs[used + j]);
                    if (frame == NULL) failed = 1;
                    else PyTuple_SET_ITEM(msg, j, frame);
                }
                zc_msg_close(&msgs[used + j]);
            }
            used += parts[i];
            if (msg != NULL) {
                if (failed) Py_DECREF(msg);
                else PyList_SET_ITEM(out, i, msg);
            }
        }
        if (failed) {
            Py_XDECREF(out);
            return NULL;
        }
        PyObject *result = Py_BuildValue("(Ni)", out, status);
        return result;
    }

    /* An array's header as wire.pack_msg writes it in the common case, msgpack
       [version, MSG, subject, seq, ts, flags, None, None, [sid]] (both < 128), read in
       C: ok is 0 for anything else (other shapes, types or sizes, trailing bytes),
       which then takes msgpack's general way. The subject is head[soff:soff+slen]. */
    typedef struct { int ok; Py_ssize_t soff; Py_ssize_t slen; long long seq; double ts;
                     long long flags; long long sid; } zc_head;

    static int zc_mp_int(const unsigned char **pp, const unsigned char *end, long long *out) {
        const unsigned char *p = *pp;
        unsigned long long u = 0;
        int n = 0, sign = 0;
        if (p >= end) return 0;
        unsigned char c = *p++;
        if (c <= 0x7f) { *out = c; *pp = p; return 1; }
        if (c >= 0xe0) { *out = (signed char)c; *pp = p; return 1; }
        switch (c) {
            case 0xcc: n = 1; break;
            case 0xcd: n = 2; break;
            case 0xce: n = 4; break;
            case 0xcf: n = 8; break;
            case 0xd0: n = 1; sign = 1; break;
            case 0xd1: n = 2; sign = 1; break;
            case 0xd2: n = 4; sign = 1; break;
            case 0xd3: n = 8; sign = 1; break;
            default: return 0;
        }
        if (end - p < n) return 0;
        for (int i = 0; i < n; i++) u = (u << 8) | p[i];
        if (sign) {
            if (n < 8 && (u >> (8 * n - 1)) & 1) u |= ~0ULL << (8 * n);  /* sign-extend */
            *out = (long long)u;
        } else {
            if (u > 0x7fffffffffffffffULL) return 0;
            *out = (long long)u;
        }
        *pp = p + n;
        return 1;
    }

    static zc_head zc_unpack_head(const char *data, Py_ssize_t size, int version, int kind) {
        zc_head h;
        const unsigned char *p = (const unsigned char *)data, *end = p + size;
        Py_ssize_t slen;
        h.ok = 0;
        if (size < 3 || p[0] != 0x99 || p[1] != version || p[2] != kind) return h;
        p += 3;
        if (p >= end) return h;
        if (*p >= 0xa0 && *p <= 0xbf) { slen = *p & 0x1f; p += 1; }
        else if (*p == 0xd9 && end - p >= 2) { slen = p[1]; p += 2; }
        else if (*p == 0xda && end - p >= 3) { slen = ((Py_ssize_t)p[1] << 8) | p[2]; p += 3; }
        else return h;
        if (end - p < slen) return h;
        h.soff = (Py_ssize_t)(p - (const unsigned char *)data);
        h.slen = slen;
        p += slen;
        if (!zc_mp_int(&p, end, &h.seq)) return h;
        if (end - p < 9 || *p != 0xcb) return h;
        {
            unsigned long long u = 0;
            for (int i = 1; i < 9; i++) u = (u << 8) | p[i];
            memcpy(&h.ts, &u, 8);
            p += 9;
        }
        if (!zc_mp_int(&p, end, &h.flags)) return h;
        if (end - p < 3 || p[0] != 0xc0 || p[1] != 0xc0 || p[2] != 0x91) return h;
        p += 3;
        if (!zc_mp_int(&p, end, &h.sid)) return h;
        h.ok = p == end;
        return h;
    }

    /* Zero-copy sends: libzmq sends a large frame straight from the Python object's
       buffer, held (a Py_buffer) until libzmq is done with it. libzmq says so from its
       own I/O thread, which must never wait for the GIL: the callback only puts the
       hold on a list (a mutex, no GIL), and zc_release_sent (GIL held: the next send,
       the I/O thread's next turn) lets go of the buffers. pyzmq's copy=False does the
       same through a Python thread and an inproc socket per send. */
    typedef struct zc_hold { Py_buffer view; struct zc_hold *next; } zc_hold;
    static pthread_mutex_t zc_sent_lock = PTHREAD_MUTEX_INITIALIZER;
    static zc_hold *zc_sent = NULL;

    static void zc_sent_cb(void *data, void *hint) {
        zc_hold *hold = (zc_hold *)hint;
        pthread_mutex_lock(&zc_sent_lock);
        hold->next = zc_sent;
        __atomic_store_n(&zc_sent, hold, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&zc_sent_lock);
    }

    /* Let go of the buffers libzmq has sent (GIL held); how many. */
    static Py_ssize_t zc_release_sent(void) {
        zc_hold *hold, *next;
        Py_ssize_t n = 0;
        if (__atomic_load_n(&zc_sent, __ATOMIC_ACQUIRE) == NULL) return 0;
        pthread_mutex_lock(&zc_sent_lock);
        hold = zc_sent;
        zc_sent = NULL;
        pthread_mutex_unlock(&zc_sent_lock);
        while (hold != NULL) {
            next = hold->next;
            PyBuffer_Release(&hold->view);
            PyMem_RawFree(hold);
            hold = next;
            n++;
        }
        return n;
    }

    /* Send one frame from obj's buffer without a copy (ZC_DONTWAIT added), holding
       the GIL: 0, or the errno (EAGAIN: the peer's queue is full, nothing sent; the
       buffer is let go later all the same); -1 when obj has no contiguous buffer
       (a Python error is set). */
    static int zc_send_zerocopy(PyObject *handle, PyObject *obj, int flags) {
        void *sock = zc_bound ? PyLong_AsVoidPtr(handle) : NULL;
        zc_hold *hold;
        zc_msg_t msg;
        if (sock == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null socket");
            return -1;
        }
        zc_release_sent();
        hold = (zc_hold *)PyMem_RawMalloc(sizeof(zc_hold));
        if (hold == NULL) { PyErr_NoMemory(); return -1; }
        if (PyObject_GetBuffer(obj, &hold->view, PyBUF_SIMPLE) < 0) {
            PyMem_RawFree(hold);
            return -1;
        }
        if (zc_msg_init_data(&msg, hold->view.buf, (size_t)hold->view.len, zc_sent_cb,
                             hold) < 0) {
            int err = zc_errno();
            PyBuffer_Release(&hold->view);
            PyMem_RawFree(hold);
            return err ? err : EIO;
        }
        if (zc_msg_send(&msg, sock, flags | ZC_DONTWAIT) < 0) {
            int err = zc_errno();
            zc_msg_close(&msg);  /* calls zc_sent_cb: released on the next turn */
            return err ? err : EIO;
        }
        return 0;
    }

    /* wire.lone_frames' one frame (the fixed layout "<BBBBqdqqH", then the subject's
       UTF-8 and the payload): little-endian hosts only (zcore.LITTLE). */
    static PyObject *zc_pack_one(int version, int kind, int one, long long seq, double ts,
                                 long long sid, long long req_id, PyObject *subject,
                                 PyObject *data) {
        Py_ssize_t slen = PyBytes_GET_SIZE(subject), dlen = PyBytes_GET_SIZE(data);
        PyObject *out;
        char *p;
        if (slen > 0xFFFF) { PyErr_SetString(PyExc_OverflowError, "subject"); return NULL; }
        out = PyBytes_FromStringAndSize(NULL, 38 + slen + dlen);
        if (out == NULL) return NULL;
        p = PyBytes_AS_STRING(out);
        p[0] = (char)0xC1; p[1] = (char)version; p[2] = (char)kind; p[3] = (char)one;
        memcpy(p + 4, &seq, 8); memcpy(p + 12, &ts, 8); memcpy(p + 20, &sid, 8);
        memcpy(p + 28, &req_id, 8);
        unsigned short len16 = (unsigned short)slen;
        memcpy(p + 36, &len16, 2);
        memcpy(p + 38, PyBytes_AS_STRING(subject), slen);
        memcpy(p + 38 + slen, PyBytes_AS_STRING(data), dlen);
        return out;
    }

    /* The fields of a one-frame message's fixed layout (the caller checked its first
       four bytes and its size >= 38). */
    typedef struct { long long seq; double ts; long long sid; long long req_id;
                     Py_ssize_t slen; } zc_one;
    static zc_one zc_unpack_one(const char *p) {
        zc_one one;
        unsigned short len16;
        memcpy(&one.seq, p + 4, 8); memcpy(&one.ts, p + 12, 8); memcpy(&one.sid, p + 20, 8);
        memcpy(&one.req_id, p + 28, 8); memcpy(&len16, p + 36, 2);
        one.slen = len16;
        return one;
    }

    static double zc_mono(void) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (double)t.tv_sec + t.tv_nsec * 1e-9;
    }

    static double zc_wall(void) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        return (double)t.tv_sec + t.tv_nsec * 1e-9;
    }

    /* Send one frame of bytes, holding the GIL (a small copy: no hand-over of the GIL
       for it); ZC_DONTWAIT is always added. 0, or the errno (EAGAIN: the peer's queue
       is full; nothing was sent); -1 when data is not bytes. */
    static int zc_send_bytes(PyObject *handle, PyObject *data, int flags) {
        void *sock = zc_bound ? PyLong_AsVoidPtr(handle) : NULL;
        if (sock == NULL || !PyBytes_CheckExact(data)) { PyErr_Clear(); return -1; }
        if (zc_send(sock, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                    flags | ZC_DONTWAIT) < 0) {
            int err = zc_errno();
            return err ? err : EIO;
        }
        return 0;
    }
    """
    int zc_bind(object addresses)
    bytes zc_pack_one(int version, int kind, int one, long long seq, double ts, long long sid,
                      long long req_id, bytes subject, bytes data)
    ctypedef struct zc_one:
        long long seq
        double ts
        long long sid
        long long req_id
        Py_ssize_t slen
    zc_one zc_unpack_one(const char *p)
    ctypedef struct zc_head:
        int ok
        Py_ssize_t soff
        Py_ssize_t slen
        long long seq
        double ts
        long long flags
        long long sid
    zc_head zc_unpack_head(const char *data, Py_ssize_t size, int version, int kind)
    double zc_mono()
    double zc_wall()
    object zc_drain(object handle, long timeout_ms)
    object zc_frame_class()
    size_t zc_frame_address(object obj)
    int zc_send_bytes(object handle, object data, int flags)
    int zc_send_zerocopy(object handle, object obj, int flags) except? -1
    Py_ssize_t zc_release_sent()
    int ZC_SNDMORE


from mesh.engine.link cimport Link
from mesh.message cimport Message
from mesh.stats cimport Counters, LatencyHistogram

cdef object _KNOWN
cdef bytes _FIXED
cdef long _TENSOR
cdef Py_ssize_t _ZERO_COPY
cdef object _array_specs
cdef Py_ssize_t _ARRAY_SPECS_MAX
cdef object _frombuffer
cdef int _CORE_TURNS
cdef double _CREDIT_RETRY
cdef object _STOP
cdef object get_ident
cdef bint LITTLE
cdef int _VERSION
cdef int _MSG
cdef int _REPLY
cdef int _ONE
cdef Py_ssize_t _ONE_SIZE
cdef Py_ssize_t _REPLY_SIZE

@cython.locals(hb=double, seed_interval=double, timers_at=double, now=double, wake_at=double,
               credit_due=double, wait_ms=long, dirty=bint)
cpdef io_loop(object node, bint core, double next_tick, double next_seed, double seed_delay)

@cython.locals(status=int, turn=int, last=Py_ssize_t, index=Py_ssize_t, holds=bint, now=double,
               handled=bint)
cpdef drain_core(object node, long wait_ms)

@cython.locals(counters=Counters)
cpdef bint send_frame(object node, Link link, object peer_id, bytes frame, Py_ssize_t nbytes) except -1

@cython.locals(last=Py_ssize_t, index=Py_ssize_t, flags=int, rc=int, nbytes=Py_ssize_t)
cpdef send_parts(object sock, list frames)

cpdef bytes pack_one(object subject, object seq, double ts, object sid, object req_id, bytes data)

@cython.locals(size=Py_ssize_t, p="const char *", one=zc_one, seq="long long", ts=double,
               sid="long long", req_id="long long", slen=Py_ssize_t,
               msg=Message, nbytes=Py_ssize_t, start=double, took=double, kind=int)
cpdef bint on_one(object node, bytes ident, bytes head) except -1

cpdef object _as_frame(object frame)

@cython.locals(address=size_t, nbytes=Py_ssize_t, h=zc_head, p="const char *", seq="long long",
               ts=double, sid="long long")
cpdef bint on_array(object node, tuple msg) except -1

@cython.locals(counters=Counters, latency=double, now=double, histogram=LatencyHistogram)
cdef object _admit(object node, object peer, object sub, object subject, long long seq, double ts,
                   Py_ssize_t nbytes)

@cython.locals(req_id="long long")
cdef bint _on_reply(object node, bytes ident, bytes head) except -1

cpdef dispatch_loop(object node)
cpdef run_one(object node, object sub, object msg)

@cython.locals(now=double)
cpdef return_credit(object node, object sub, object grant, object publisher, Py_ssize_t count,
                    Py_ssize_t nbytes)

cpdef Py_ssize_t _credit_threshold(Py_ssize_t window)
cpdef Py_ssize_t _ride_least(Py_ssize_t threshold)

@cython.locals(now=double)
cpdef object owed_credit(object node, object peer_id)

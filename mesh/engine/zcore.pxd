# C for mesh/engine/zcore.py in the compiled build (Cython, pure-Python mode): libzmq
# called through function pointers that the .py resolves at run time from the libzmq
# pyzmq loaded (never linked at build time: pip builds in an isolated environment).

cimport cython

cdef extern from *:
    """
    #include <errno.h>
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
    /* Messages read per call without the GIL (two frames each at most). */
    #define ZC_BATCH 64

    static int (*zc_msg_init)(zc_msg_t *);
    static int (*zc_msg_recv)(zc_msg_t *, void *, int);
    static int (*zc_msg_close)(zc_msg_t *);
    static void *(*zc_msg_data)(zc_msg_t *);
    static size_t (*zc_msg_size)(const zc_msg_t *);
    static int (*zc_msg_more)(const zc_msg_t *);
    static int (*zc_poll)(zc_pollitem_t *, int, long);
    static int (*zc_send)(void *, const void *, size_t, int);
    static int (*zc_errno)(void);
    static int zc_bound = 0;

    /* The addresses of the nine functions above, in that order (Python ints). */
    static int zc_bind(PyObject *addresses) {
        void **slots[9] = {(void **)&zc_msg_init, (void **)&zc_msg_recv,
                           (void **)&zc_msg_close, (void **)&zc_msg_data,
                           (void **)&zc_msg_size, (void **)&zc_msg_more, (void **)&zc_poll,
                           (void **)&zc_send, (void **)&zc_errno};
        if (!PyTuple_Check(addresses) || PyTuple_GET_SIZE(addresses) != 9) return 0;
        for (int i = 0; i < 9; i++) {
            void *p = PyLong_AsVoidPtr(PyTuple_GET_ITEM(addresses, i));
            if (p == NULL) { PyErr_Clear(); return 0; }
            *slots[i] = p;
        }
        zc_bound = 1;
        return 1;
    }

    static PyObject *zc_frame_bytes(zc_msg_t *msg) {
        return PyBytes_FromStringAndSize((const char *)zc_msg_data(msg),
                                         (Py_ssize_t)zc_msg_size(msg));
    }

    /* Read what the socket has, waiting up to timeout_ms for it (0: not at all; -1:
       forever), without the GIL; then, with it, return (messages, status): each
       message a tuple of its first two frames as bytes (one if it has only one),
       status 0 when the socket had no more, 1 when ZC_BATCH messages were read
       (more may wait), 2 when the last message has more frames (the caller reads
       them before anything else), or -errno (ETERM: the context ends; ENOTSOCK:
       the socket is closed). EINTR ends the wait with what was read (maybe nothing). */
    static PyObject *zc_drain(PyObject *handle, long timeout_ms) {
        zc_msg_t msgs[2 * ZC_BATCH];
        int parts[ZC_BATCH];
        int n = 0, status = 0, waited = (timeout_ms == 0);
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
            zc_msg_t *first = &msgs[2 * n];
            if (n == ZC_BATCH) { status = 1; break; }
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
            parts[n] = 1;
            if (zc_msg_more(first)) {
                /* The rest of a message is there at once (libzmq delivers whole ones). */
                zc_msg_t *second = first + 1;
                zc_msg_init(second);
                if (zc_msg_recv(second, sock, ZC_DONTWAIT) < 0) {
                    status = -zc_errno();
                    zc_msg_close(second);
                    n++;
                    break;
                }
                parts[n] = 2;
                if (zc_msg_more(second)) { n++; status = 2; break; }
            }
            n++;
        }
        Py_END_ALLOW_THREADS
        PyObject *out = PyList_New(n);
        int failed = out == NULL;
        for (int i = 0; i < n; i++) {
            PyObject *msg = NULL;
            if (!failed) {
                msg = PyTuple_New(parts[i]);
                failed = msg == NULL;
            }
            for (int j = 0; j < parts[i]; j++) {
                if (!failed) {
                    PyObject *frame = zc_frame_bytes(&msgs[2 * i + j]);
                    if (frame == NULL) failed = 1;
                    else PyTuple_SET_ITEM(msg, j, frame);
                }
                zc_msg_close(&msgs[2 * i + j]);
            }
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
    double zc_mono()
    double zc_wall()
    object zc_drain(object handle, long timeout_ms)
    int zc_send_bytes(object handle, object data, int flags)
    int ZC_SNDMORE


from mesh.engine.link cimport Link
from mesh.message cimport Message
from mesh.stats cimport Counters, LatencyHistogram

cdef object _KNOWN
cdef bytes _FIXED
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

cpdef bytes pack_one(object subject, object seq, double ts, object sid, object req_id, bytes data)

@cython.locals(size=Py_ssize_t, p="const char *", one=zc_one, seq="long long", ts=double,
               sid="long long", req_id="long long", slen=Py_ssize_t, counters=Counters,
               msg=Message, latency=double, nbytes=Py_ssize_t, start=double, took=double,
               now=double, kind=int,
               histogram=LatencyHistogram)
cpdef bint on_one(object node, bytes ident, bytes head) except -1

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

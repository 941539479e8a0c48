# C types for mesh/engine/link.py in the compiled build (Cython, pure-Python
# mode): the .py is the source of both builds. Link becomes a C type: the hot
# path (engine/fastpath.py) reaches its batch and counters without a lookup.

from mesh.stats cimport Counters


cdef class Link:
    cdef public object peer_id
    cdef public object sock
    cdef public object ctl
    cdef public object lock
    cdef public object cond
    cdef public object credit_in
    cdef public dict windows
    cdef public object transport
    cdef public object endpoint
    cdef public bint closed
    cdef public Counters counters
    cdef public list batch
    cdef public Py_ssize_t batch_bytes
    cdef public Py_ssize_t batch_count
    cdef public Py_ssize_t batch_cap
    cdef public double batch_since
    cdef public double last_send
    cdef public object shm_out
    cdef public object rdma
    cdef public bint rdma_off
    cdef public dict rdma_trackers
    cdef public object rdma_order

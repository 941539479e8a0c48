# C types for mesh/flow.py in the compiled build (Cython, pure-Python mode): the
# .py is the source of both builds. CreditWindow becomes a C type whose counters
# the hot path (engine/fastpath.py) reads and writes without a dict lookup.
cimport cython


cdef class CreditWindow:
    cdef public Py_ssize_t credits
    cdef public object credit_bytes  # int, or None: no byte limit
    cdef public object overflow
    cdef public Py_ssize_t max_pending
    cdef public Py_ssize_t in_flight
    cdef public Py_ssize_t in_flight_bytes
    cdef public object _pending
    cdef public Py_ssize_t pending_bytes
    cdef public object drops
    cdef public Py_ssize_t sent
    cdef public Py_ssize_t cancelled
    cdef public Py_ssize_t excess_credit
    cdef public object closed_reason


# The receiver's batch parser (one call per batch frame) and run cutter (a loop per message).
@cython.locals(size=Py_ssize_t, off=Py_ssize_t, hsize=Py_ssize_t, count=Py_ssize_t,
               total=Py_ssize_t, runs=list)
cpdef list decode_runs(object data)

@cython.locals(pos=Py_ssize_t, end=Py_ssize_t, n=Py_ssize_t, start="const char *", payloads=list)
cpdef list split_run(bytes blob, object sizes, Py_ssize_t at=*)

@cython.locals(count=Py_ssize_t, size=Py_ssize_t, largest=Py_ssize_t, hsize=Py_ssize_t,
               parts=list, sizes=list)
cpdef bytes encode_batch(object runs)

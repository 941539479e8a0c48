# C types for mesh/stats.py in the compiled build (Cython, pure-Python mode).

cimport cython

cdef double _BASE
cdef double _LOG_STEP
cdef Py_ssize_t _LAST


cdef class LatencyHistogram:
    cdef public list counts
    cdef public Py_ssize_t total
    cdef public double sum

    # The I/O thread records every message: a C call from zcore.on_one.
    @cython.locals(index=Py_ssize_t)
    cpdef record(self, double seconds, Py_ssize_t count=*)

cdef class Counters:
    cdef public Py_ssize_t msgs_in
    cdef public Py_ssize_t msgs_out
    cdef public Py_ssize_t bytes_in
    cdef public Py_ssize_t bytes_out
    cdef public object drops

# C types for mesh/stats.py in the compiled build (Cython, pure-Python mode).

cdef class Counters:
    cdef public Py_ssize_t msgs_in
    cdef public Py_ssize_t msgs_out
    cdef public Py_ssize_t bytes_in
    cdef public Py_ssize_t bytes_out
    cdef public object drops

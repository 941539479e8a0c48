# C types for mesh/engine/fastpath.py in the compiled build (Cython, pure-Python
# mode): the .py is the source of both builds.

cimport cython

from mesh.engine.link cimport Link
from mesh.flow cimport CreditWindow
from mesh.stats cimport Counters
from mesh.engine cimport zcore

cdef Py_ssize_t _BATCH_SMALL
cdef double _BURST_GAP
cdef str _RESERVED


cdef class HotPublisher:
    cdef object node
    cdef dict links
    cdef dict seqs
    cdef object routing
    cdef Counters counters
    cdef Py_ssize_t batch_max
    cdef Py_ssize_t max_size
    cdef object wall
    cdef tuple last
    cdef bint core

    @cython.locals(nbytes=Py_ssize_t, links=dict, link=Link, counters=Counters,
                   batch_max=Py_ssize_t, ts=double, last=tuple, peers=dict)
    cpdef bint publish(self, object subject, object data, object headers, object timeout) except -1

    @cython.locals(nbytes=Py_ssize_t, link=Link, peers=dict)
    cpdef bint request(self, object subject, object data, object req_id) except -1

    @cython.locals(now=double)
    cdef bint _lone(self, Link link, object peer_id, object sid, object subject, object counter,
                    object data, Py_ssize_t nbytes, object timeout, object req_id) except -1

    @cython.locals(batch=list, run=list, counters=Counters, last=Py_ssize_t, this=Py_ssize_t)
    cdef bint _append(self, Link link, object sid, object subject, object seq, object data,
                      Py_ssize_t nbytes) except -1


@cython.locals(in_flight=Py_ssize_t, limit=Py_ssize_t)
cdef inline bint _take_credit(CreditWindow window, Py_ssize_t nbytes) except -1

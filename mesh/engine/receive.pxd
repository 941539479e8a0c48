# C types for mesh/engine/receive.py in the compiled build (Cython, pure-Python
# mode): the .py is the source of both builds.

cimport cython

from mesh.message cimport Message

cdef double _CREDIT_HOLD
cdef object _SEQ_TYPED


cdef class Run:
    cdef public object sub
    cdef public object grant
    cdef public object publisher
    cdef public Py_ssize_t count
    cdef public object payloads
    cdef public bytes blob
    cdef public Py_ssize_t at
    cdef public object sizes
    cdef public object subject
    cdef public object headers
    cdef public object seq
    cdef public object array
    cdef public object request_id
    cdef public object node
    cdef public object reply_to


cpdef queue_run(list out, object sub, object subject, object payloads, object blob,
                object headers, object sender, object seq, object array, object request_id,
                object node, object reply_to, object grant, object sizes, Py_ssize_t count,
                Py_ssize_t at=*)

cdef _handler_failed(object node, object sub, object msg)

cdef _flush(object node, dict consumed)

@cython.locals(consumed=dict, run=Run, tally=list, i=Py_ssize_t, done=Py_ssize_t,
               count=Py_ssize_t, nbytes=Py_ssize_t, size=Py_ssize_t, threshold=Py_ssize_t,
               since=double, now=double, msg=Message, blob=bytes, start="const char *",
               pos=Py_ssize_t, first=Py_ssize_t, typed=bint)
cpdef run_list(object node, list item)

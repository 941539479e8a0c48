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
    cdef public list msgs
    cdef public object sizes


@cython.locals(i=Py_ssize_t, msgs=list, first=Py_ssize_t, typed=bint, msg=Message)
cpdef queue_run(list out, object sub, object subject, object payloads, object headers,
                object sender, object seq, object array, object request_id, object node,
                object reply_to, object grant, object sizes, Py_ssize_t count)

cdef _handler_failed(object node, object sub, object msg)

cdef _flush(object node, dict consumed)

@cython.locals(consumed=dict, run=Run, msgs=list, tally=list, i=Py_ssize_t, done=Py_ssize_t,
               count=Py_ssize_t, nbytes=Py_ssize_t, size=Py_ssize_t, threshold=Py_ssize_t,
               since=double, now=double)
cpdef run_list(object node, list item)

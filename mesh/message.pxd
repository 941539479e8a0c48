# C types for mesh/message.py in the compiled build (Cython, pure-Python mode):
# the .py is the source of both builds. Message becomes a C type (made once per
# received message: incoming() fills its fields without an __init__ call).

cimport cython

cdef class Message:
    cdef public object subject
    cdef public object data
    cdef public object _headers
    cdef public object sender
    cdef public object seq
    cdef public object request_id
    cdef public object _desc
    cdef public object _array
    cdef public object _node
    cdef public object _reply_to
    cdef public object _credit


# msg typed: its fields are stored in the C struct (untyped, each store was a
# generic setattr through the type's descriptors: ~1,400 instructions a message).
@cython.locals(msg=Message)
cpdef Message incoming(object subject, object data, object headers, object sender, object seq,
                       object array, object request_id, object node, object reply_to,
                       object credit)

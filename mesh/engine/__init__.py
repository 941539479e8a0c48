"""The engine behind ``mesh.Node``: one owner per socket, at most one hand-off per message.

Threads, and the sockets each owns::

    application threads                      I/O thread mesh-io-<node> (loop.py)
      publish(), request(), respond()          owns the ROUTER (everything inbound and
        │ send directly, under link.lock       the wake-ups), every link.ctl (control
        ▼                                      DEALER), seed/probe DEALERs, the timers
      link.sock: data DEALER, one per peer ──▶ the peer's ROUTER
                                               reads each message, then:
      sub.next() / request() ◀── inbox / reply event ───┤ one hand-off
                                 inline handler ◀───────┤ runs right there: none
      dispatch thread mesh-dispatch-<node> ◀────────────┘ one hand-off
        (dispatch.py): ordinary handlers; credit goes back on link.sock
        (or rides on the next frame to that publisher)

Modules: loop.py (the I/O thread), link.py (Link, the send path, credit,
batching), dispatch.py (delivery, handlers, credit return), handshake.py
(hello, interest, membership), status.py (the snapshot), bulk.py (the node's
bulk channels) with bulk_shm.py and bulk_rdma.py behind the interface in
transports/bulk.py, options.py and common.py. Each class here is a mixin of
``mesh.Node``: the state lives on the node, each attribute set up by the
``_init_*`` of the module that owns it. Publishes made on the I/O or dispatch
thread never wait for credit (link.py says why).
"""

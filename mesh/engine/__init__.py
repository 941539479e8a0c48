"""The engine behind ``mesh.Node``: one owner per socket, at most one hand-off per message.

Threads, and the sockets each owns::

    application threads ──publish/request──▶ link.sock (data DEALER per peer, under link.lock)
            ▲   ▲                                  │
      next()│   │reply                             ▼ to the peer's ROUTER
            │   │
    I/O thread (loop.py) ── owns the ROUTER (all inbound), every link.ctl
            │               (control DEALER), seed/probe DEALERs, the timers;
            │               runs inline handlers; hands the rest on ──┐
            ▼                                                         ▼
    inbox / reply event (one hand-off)        dispatch thread (dispatch.py): handlers,
                                              credit back on link.sock when it is free

Modules: loop.py (the I/O thread), link.py (the send path, credit, batching),
dispatch.py (delivery, handlers, credit return), handshake.py (hello,
interest, membership), status.py (the snapshot), bulk_shm.py and bulk_rdma.py
(the bulk channels), options.py and common.py. Each is a mixin of
``mesh.Node``: the state lives on the node, each attribute set up by the
``_init_*`` of the module that owns it. Publishes made on the I/O or dispatch
thread never wait for credit (link.py says why).
"""

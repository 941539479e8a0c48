"""A brokerless ZeroMQ peer-to-peer messaging mesh for distributed machine learning.

    import mesh
    with mesh.Node(name="worker-3", cluster="exp-42") as node:
        node.subscribe("grad.>", handler)
        node.publish("grad.w3.layer1", array)
"""

from mesh import _build

_build.install()  # before any compiled module is imported (see mesh/_build.py)

from mesh import transports  # noqa: E402
from mesh.errors import (  # noqa: E402
    BackpressureError,
    BulkLinkError,
    ClosedError,
    CollectiveAborted,
    ConfigError,
    InvalidSubject,
    MeshError,
    MessageTooLarge,
    NoRespondersError,
    PeerLostError,
    PermissionDenied,
    ProtocolError,
    TimeoutError,
    TransportError,
)
from mesh.message import Message, Subscription  # noqa: E402
from mesh.node import Node  # noqa: E402
from mesh.peers import PeerInfo  # noqa: E402

# Which build of the hot path runs: True when every module of mesh._build.COMPILED
# came from its Cython extension (built by pip install unless MESH_PURE_PYTHON=1).
compiled: bool = _build.compiled()

__version__ = "0.1.0"

__all__ = [
    "BackpressureError",
    "BulkLinkError",
    "ClosedError",
    "CollectiveAborted",
    "ConfigError",
    "InvalidSubject",
    "MeshError",
    "Message",
    "MessageTooLarge",
    "Node",
    "NoRespondersError",
    "PeerInfo",
    "PeerLostError",
    "PermissionDenied",
    "ProtocolError",
    "Subscription",
    "TimeoutError",
    "TransportError",
    "transports",
]

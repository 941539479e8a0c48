"""A brokerless ZeroMQ peer-to-peer messaging mesh for distributed machine learning.

    import mesh
    with mesh.Node(name="worker-3", cluster="exp-42") as node:
        node.subscribe("grad.>", handler)
        node.publish("grad.w3.layer1", array)
"""

from mesh import transports
from mesh.errors import (
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
from mesh.message import Message, Subscription
from mesh.node import Node
from mesh.peers import PeerInfo

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

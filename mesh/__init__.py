"""A brokerless ZeroMQ peer-to-peer messaging mesh for distributed machine learning."""

from mesh.errors import (
    BackpressureError,
    ClosedError,
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

__all__ = [
    "BackpressureError",
    "ClosedError",
    "ConfigError",
    "InvalidSubject",
    "MeshError",
    "MessageTooLarge",
    "NoRespondersError",
    "PeerLostError",
    "PermissionDenied",
    "ProtocolError",
    "TimeoutError",
    "TransportError",
]

"""Every error the mesh raises derives from :class:`MeshError`.

Messages say what happened and what to do about it.
"""

from __future__ import annotations

import builtins


class MeshError(Exception):
    """Base class of every error raised by the mesh."""


class InvalidSubject(MeshError, ValueError):
    """A subject or pattern breaks the subject rules (see README, "Subjects")."""


class ConfigError(MeshError, ValueError):
    """A node or call was given an option it cannot use."""


class ClosedError(MeshError):
    """The node (or subscription) was closed; create a new one."""


class TimeoutError(MeshError, builtins.TimeoutError):  # noqa: A001 - API name
    """A wait ran out of time."""


class NoRespondersError(MeshError):
    """A request found no subscriber anywhere in the mesh."""


class BackpressureError(MeshError):
    """A publish could not be sent in time because the receiver is not keeping up."""


class PeerLostError(MeshError):
    """A peer died or stopped answering during an operation that needed it."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class BulkLinkError(PeerLostError):
    """The bulk tcp connection to a peer broke mid-transfer (the peer died, or the
    network between the two failed). Only that transfer is lost; later ones to the
    peer go over its ZeroMQ link (``status()["peers"][i]["tcpbulk"]`` says why)."""


class CollectiveAborted(MeshError):
    """Another member failed this collective (its message says which rank and why).

    Raised on the ranks that did not fail themselves, so that no rank waits for
    a peer that gave up; the group stays usable for the next collective.
    """


class PermissionDenied(MeshError):
    """The cluster policy forbids this publish or subscribe."""


class MessageTooLarge(MeshError, ValueError):
    """A payload exceeds the node's ``max_message_size``."""


class ProtocolError(MeshError):
    """A frame from the network is malformed. Counted and dropped, never raised to users."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(MeshError):
    """A transport cannot be used (unknown name, not available on this host)."""


class MissingDependency(ConfigError, ImportError):
    """An optional part of the mesh needs a package that is not installed (the message
    names the pip command). Also an ImportError, so ``except ImportError`` works."""

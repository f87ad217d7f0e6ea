"""The dmoe wire contract, apart from the messages: service and method names, metadata keys, shared limits.

Peers and clients read every name and limit they share from here, so each is written once (the messages
themselves are ``proto/dmoe/v1/*.proto``; their encoders and decoders are the rest of `proto`). Imports only the
standard library and the generated protobuf modules, never torch: the health check and other light tools
import it too.
"""

from __future__ import annotations

from enum import StrEnum

from proto.dmoe.v1 import expert_pb2
from proto.dmoe.v1.tensor_pb2 import COMPRESSION_BLOCKWISE_8BIT, COMPRESSION_FLOAT16, COMPRESSION_NONE

SERVICE_NAME: str = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
"""The full name of the service every peer serves, ``dmoe.v1.ExpertService`` (as ``expert.proto`` declares it)."""


class Method(StrEnum):
    """The methods of `SERVICE_NAME`; each value is the method's name in ``expert.proto``.

    `path` is what a client calls and a server registers. Forward and Backward come in three forms: unary
    (`unary`), chunked streams for requests over the message limit (`stream`) and batches of small requests
    for one peer (`many`). GetState streams one expert's state to another replica.
    """

    FORWARD = "Forward"
    BACKWARD = "Backward"
    FORWARD_STREAM = "ForwardStream"
    BACKWARD_STREAM = "BackwardStream"
    FORWARD_MANY = "ForwardMany"
    BACKWARD_MANY = "BackwardMany"
    INFO = "Info"
    GET_STATE = "GetState"

    @property
    def path(self) -> str:
        """The gRPC method path, e.g. ``/dmoe.v1.ExpertService/Forward``."""
        return method_path(self)

    @property
    def streaming(self) -> bool:
        """Whether requests and responses are streams (both are, for the stream methods)."""
        return self in (Method.FORWARD_STREAM, Method.BACKWARD_STREAM)

    @property
    def streams_answers(self) -> bool:
        """Whether one request gets a stream of answers (GetState)."""
        return self is Method.GET_STATE

    @property
    def batched(self) -> bool:
        """Whether the request is a batch of several requests (ForwardMany, BackwardMany)."""
        return self in (Method.FORWARD_MANY, Method.BACKWARD_MANY)

    @property
    def backward(self) -> bool:
        """Whether this is a form of Backward."""
        return self in (Method.BACKWARD, Method.BACKWARD_STREAM, Method.BACKWARD_MANY)

    @classmethod
    def unary(cls, backward: bool) -> Method:
        """Forward or Backward."""
        return cls.BACKWARD if backward else cls.FORWARD

    @classmethod
    def stream(cls, backward: bool) -> Method:
        """ForwardStream or BackwardStream."""
        return cls.BACKWARD_STREAM if backward else cls.FORWARD_STREAM

    @classmethod
    def many(cls, backward: bool) -> Method:
        """ForwardMany or BackwardMany."""
        return cls.BACKWARD_MANY if backward else cls.FORWARD_MANY

    @classmethod
    def from_path(cls, path: str) -> Method | None:
        """The method a gRPC method path names, or None for a path outside `SERVICE_NAME`."""
        service, _, name = path.removeprefix("/").partition("/")
        if service != SERVICE_NAME:
            return None
        try:
            return cls(name)
        except ValueError:
            return None


def method_path(name: str) -> str:
    """The gRPC path of method ``name`` of `SERVICE_NAME`: ``method_path("Forward")`` is
    ``"/dmoe.v1.ExpertService/Forward"``."""
    return f"/{SERVICE_NAME}/{name}"


HEALTH_SERVICE = "grpc.health.v1.Health"
"""The standard gRPC health service; a peer reports `SERVICE_NAME` (and the server, ``""``) there."""

OPEN_SERVICES: tuple[str, ...] = (f"/{HEALTH_SERVICE}/",)
"""Method path prefixes a peer with a swarm key still answers without one, so that orchestrators can probe it."""

SWARM_KEY_METADATA = "dmoe-swarm-key"
"""Call metadata carrying the swarm key; a peer with a key refuses calls without it (UNAUTHENTICATED)."""

CLIENT_ID_METADATA = "dmoe-client-id"
"""Call metadata carrying the caller's random id (one per router process), for the peer's per-client limits."""

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
"""The gRPC message limit both sides use by default; requests and responses over it travel as chunked streams."""

COALESCE_BYTES = 256 << 10
"""Requests with at most this many tensor bytes may travel as one part of a ForwardMany/BackwardMany."""

MAX_BATCH_PARTS = 192
"""Most requests in one ForwardMany/BackwardMany: a client sends at most this many, a peer refuses more.

A peer computes the parts of one call in one pass, whose fixed cost is most of a small expert's: a 64 x 64 grid's
router sends a peer 90-180 parts per step in the first steps. With `COALESCE_BYTES` per part, a full batch still
fits in `DEFAULT_MAX_MESSAGE_BYTES`.
"""

LEGACY_BATCH_PARTS = 64
"""`MAX_BATCH_PARTS` of peers from before packed batches: what a client sends them in one call."""

DEFAULT_DEADLINE = 120.0
"""Seconds a peer gives a call that arrives without a deadline."""

COMPRESSION_NAMES: dict[str, int] = {
    "none": COMPRESSION_NONE,
    "float16": COMPRESSION_FLOAT16,
    "8bit": COMPRESSION_BLOCKWISE_8BIT,
}
"""The names a user gives a wire compression (flags, configs), mapped to their ``dmoe.v1.Compression`` value."""


def stream_chunk_bytes(max_message_bytes: int) -> int:
    """Payload bytes per message of a chunked stream under ``max_message_bytes``: half, to leave room for framing."""
    return max(1, max_message_bytes // 2)


def fits_one_message(payload_bytes: int, max_message_bytes: int) -> bool:
    """Whether a request whose tensors hold ``payload_bytes`` goes as one message (else as a chunked stream)."""
    return payload_bytes < max_message_bytes * 0.9

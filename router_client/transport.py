"""gRPC calls to peers: one reused `grpc.aio` channel per endpoint, unary or chunked streams by size."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import torch

from proto import (
    COMPRESSION_BLOCKWISE_8BIT,
    COMPRESSION_FLOAT16,
    COMPRESSION_NONE,
    TensorDecodeError,
    deserialize_tensor,
    expert_pb2,
    iter_tensors_from_chunks,
    serialize_tensor,
    split_tensor,
)
from proto.wire import decode_response, encode_request

SWARM_KEY_METADATA = "dmoe-swarm-key"  # the same names the peer reads
CLIENT_ID_METADATA = "dmoe-client-id"
COMPRESSIONS = {"none": COMPRESSION_NONE, "float16": COMPRESSION_FLOAT16, "8bit": COMPRESSION_BLOCKWISE_8BIT}
_METHOD = "/dmoe.v1.ExpertService/"


class ExpertCallError(Exception):
    """A remote call failed: which peer, which expert, the gRPC status (if any) and why."""

    def __init__(self, endpoint: str, uid: str, reason: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{uid}@{endpoint}: {reason}")
        self.endpoint, self.uid, self.reason, self.code = endpoint, uid, reason, code


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None):
    """TLS credentials for peers whose certificates chain to `ca` (None: plain TCP); cert+key for mutual TLS."""
    if ca is None:
        if cert or key:
            raise ValueError("client certificates need tls_ca too (the CA that signed the peers' certificates)")
        return None
    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


class ExpertTransport:
    """Sends Forward/Backward requests to peers. Must be used from a single event loop (the router's).

    Requests whose tensors fit in `max_message_bytes` go as one unary call; larger ones are chunked over
    the streaming variant. `compression` (a `COMPRESSION_*` value) applies to floating tensors both ways.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = 64 << 20,
        compression: int = COMPRESSION_NONE,
        swarm_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.max_message_bytes = max_message_bytes
        self.compression = compression
        client_id = ((CLIENT_ID_METADATA, uuid.uuid4().hex[:16]),)
        self.metadata = (((SWARM_KEY_METADATA, swarm_key),) if swarm_key else ()) + client_id
        self.credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unary_methods: dict[tuple[str, bool], grpc.aio.UnaryUnaryMultiCallable] = {}

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        """The (reused) channel to `endpoint`."""
        channel = self._channels.get(endpoint)
        if channel is None:
            options = [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.enable_retries", 0),
                ("grpc.keepalive_time_ms", 60_000),
            ]
            if self.credentials is not None:
                channel = grpc.aio.secure_channel(endpoint, self.credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            self._channels[endpoint] = channel
        return channel

    def _unary(self, endpoint: str, backward: bool):
        """The (cached) unary multicallable for Forward or Backward at `endpoint`."""
        key = (endpoint, backward)
        method = self._unary_methods.get(key)
        if method is None:
            method = self._unary_methods[key] = self.channel(endpoint).unary_unary(
                _METHOD + ("Backward" if backward else "Forward")  # bytes both ways: see `proto.wire`
            )
        return method

    async def call(
        self,
        endpoint: str,
        uid: str,
        tensors: list[torch.Tensor],
        *,
        backward: bool,
        timeout: float,
        forward_id: int = 0,
    ) -> list[torch.Tensor]:
        """Forward (or Backward) of expert `uid` at `endpoint`; raises `ExpertCallError` on any failure.

        `forward_id` (nonzero) marks a training Forward and its Backward, so that the peer can keep the
        Forward's graph for the Backward instead of recomputing it.
        """
        if timeout <= 0:
            raise ExpertCallError(endpoint, uid, "no time left before the deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
        size = sum(t.numel() * t.element_size() for t in tensors)  # an upper bound of the encoded size
        unary = size < self.max_message_bytes * 0.9
        if unary:
            request = encode_request(
                uid, tensors, response_compression=self.compression, forward_id=forward_id, compression=self.compression
            )
        else:
            messages = [serialize_tensor(t, self.compression) for t in tensors]
        try:
            if unary:
                response = await self._unary(endpoint, backward)(request, timeout=timeout, metadata=self.metadata)
                return decode_response(response)  # gRPC's fresh bytes, handed over: the tensors are views of it
            parts = await self._call_stream(
                endpoint, uid, messages, backward=backward, timeout=timeout, forward_id=forward_id
            )
            return [deserialize_tensor(part) for part in iter_tensors_from_chunks(parts)]
        except grpc.aio.AioRpcError as exc:
            raise ExpertCallError(endpoint, uid, f"{exc.code().name}: {exc.details()}", exc.code()) from None
        except TensorDecodeError as exc:
            raise ExpertCallError(endpoint, uid, f"malformed answer: {exc}") from None

    async def _call_stream(self, endpoint, uid, messages, *, backward: bool, timeout: float, forward_id: int) -> list:
        chunk_bytes = max(1, self.max_message_bytes // 2)

        def requests():
            first = True
            for message in messages:
                for part in split_tensor(message, chunk_bytes):
                    if first:
                        yield expert_pb2.ExpertRequest(
                            uid=uid, tensors=[part], response_compression=self.compression, forward_id=forward_id
                        ).SerializeToString()
                        first = False
                    else:
                        yield expert_pb2.ExpertRequest(tensors=[part]).SerializeToString()

        call = self.channel(endpoint).stream_stream(
            _METHOD + ("BackwardStream" if backward else "ForwardStream"),
            response_deserializer=expert_pb2.ExpertResponse.FromString,
        )(requests(), timeout=timeout, metadata=self.metadata)
        return [part async for response in call for part in response.tensors]

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels, self._unary_methods = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()

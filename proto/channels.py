"""Client channels to peers, as both sides open them: the message limit, no retries, fast reconnects, TLS."""

from __future__ import annotations

from pathlib import Path

import grpc

from proto.contract import DEFAULT_MAX_MESSAGE_BYTES


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


def open_channel(
    endpoint: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A `grpc.aio` channel to a peer at `endpoint` (``host:port``).

    gRPC's own retries are off (the router fails over to other replicas itself), and reconnects back off for at
    most a second, so that a peer restarted on the same port is reachable again within a fraction of a second.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(endpoint, credentials, options=options)
    return grpc.aio.insecure_channel(endpoint, options=options)

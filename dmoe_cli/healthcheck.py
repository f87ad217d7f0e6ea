"""`python -m dmoe_cli.healthcheck`: is a dmoe process serving? For container health checks and scripts.

    python -m dmoe_cli.healthcheck                  # the peer at 127.0.0.1:$DMOE_PORT, via grpc.health.v1
    python -m dmoe_cli.healthcheck 10.0.0.5:31330   # another peer
    python -m dmoe_cli.healthcheck --tcp            # a DHT node: does 127.0.0.1:$DMOE_PORT accept connections?

A peer is healthy when the standard gRPC health service reports `dmoe.v1.ExpertService` as SERVING (a peer
that is shutting down reports NOT_SERVING). A DHT node has no gRPC server, so `--tcp` only checks that its
libp2p port accepts TCP connections. Exit code 0 when healthy, 1 otherwise, with one line saying why.
Imports only grpc and the torch-free `proto.contract`, so a check takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from proto.contract import SERVICE_NAME as EXPERT_SERVICE


def default_target() -> str:
    """`127.0.0.1:$DMOE_PORT`: the process configured by the same environment, inside the same container."""
    port = os.environ.get("DMOE_PORT", "").strip()
    if not port or port == "0":
        raise ValueError("no TARGET given and DMOE_PORT is not set to a fixed port")
    return f"127.0.0.1:{port}"


def check_grpc(target: str, service: str = EXPERT_SERVICE, timeout: float = 3.0) -> tuple[bool, str]:
    """Ask the gRPC health service at `target` about `service`; (healthy, what it said)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as error:
        return False, f"{target}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '(server)'}: {status}"


def check_tcp(target: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether `target` (host:port) accepts a TCP connection."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True, f"{target}: accepts connections"
    except OSError as error:
        return False, f"{target}: {error}"


def main(argv: list[str] | None = None) -> int:
    """Run one check; exit code 0 when healthy."""
    parser = argparse.ArgumentParser(prog="python -m dmoe_cli.healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help="HOST:PORT (default: 127.0.0.1:$DMOE_PORT)")
    parser.add_argument("--tcp", action="store_true", help="only check that the port accepts TCP connections")
    parser.add_argument("--service", default=EXPERT_SERVICE, help="gRPC service to ask about ('' for the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        target = args.target or default_target()
    except ValueError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 1
    healthy, message = check_tcp(target, args.timeout) if args.tcp else check_grpc(target, args.service, args.timeout)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

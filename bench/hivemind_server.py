"""`python -m bench.hivemind_server`: a hivemind MoE server hosting dmoe's experts, for the comparisons.

It runs `hivemind.moe.Server` (hivemind's connection handlers, task pools and runtime, unchanged) over
`ModuleBackend`s that wrap dmoe's `FeedForwardExpert`, seeded per uid as a dmoe peer seeds them, with Adam
(lr 1e-3) and gradient clipping at norm 1.0 (hivemind's `ClippingWrapper`): the same weights and the same work
as the dmoe peers. Once serving, it writes ``{"pid": ..., "initial_peers": [MADDR, ...]}`` atomically to
`--ready-file` (and prints a line for people); stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def main(argv: list[str] | None = None) -> int:
    """Serve the experts until SIGTERM/SIGINT; exit code 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", required=True, help="PREFIX:COUNT:HIDDEN[,...], e.g. ffn:16:1024,tiny:16:64")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--handlers", type=int, default=8, help="hivemind connection handler processes")
    parser.add_argument("--max-batch-size", type=int, default=8192)
    parser.add_argument("--ready-file", default=None, help="write the JSON ready record here once serving")
    args = parser.parse_args(argv)

    import torch
    from hivemind import DHT
    from hivemind.moe.server import ModuleBackend, Server
    from hivemind.moe.server.layers.optim import ClippingWrapper
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    from bench.servers import expert_seed
    from peer import FeedForwardExpert, atomic_write_bytes

    torch.set_num_threads(args.threads)
    backends = {}
    for group in args.experts.split(","):
        prefix, count, hidden = group.split(":")
        for index in range(int(count)):
            uid = f"{prefix}.{index}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(expert_seed(uid))
                module = FeedForwardExpert(int(hidden))
            optimizer = ClippingWrapper(torch.optim.Adam(module.parameters(), lr=1e-3), 1.0)
            backends[uid] = ModuleBackend(
                name=uid,
                module=module,
                optimizer=optimizer,
                args_schema=(BatchTensorDescriptor(int(hidden)),),
                min_batch_size=1,
                max_batch_size=args.max_batch_size,
            )
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = Server(dht, backends, num_connection_handlers=args.handlers, device=args.device, start=True)
    maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
    if args.ready_file:
        atomic_write_bytes(args.ready_file, json.dumps({"pid": os.getpid(), "initial_peers": maddrs}).encode())
    print(f"hivemind server ready: {' '.join(maddrs)}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmarks `dmoe bench` knows: one table that the runner (`bench.cli`) and the report (`bench.report`) read."""

from __future__ import annotations

# name -> (module, one line of help); the order is the order they run in
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("bench.codec", "tensor codec encode+decode GB/s against an in-memory copy"),
    "latency": (
        "bench.latency",
        "p50/p99 of a 1- and 16-token forward, fixed and spread routing: dmoe vs hivemind vs in-process",
    ),
    "layer": ("bench.layer", "tokens/s of one MoE layer, training and inference: dmoe vs hivemind vs in-process"),
    "grid": ("bench.grid_routing", "routing cost per step against grid size (16 to 16384) and DHT nodes (4 to 32)"),
    "dht": ("bench.dht_lookup", "beam-search lookup latency over 4096 experts on 8 DHT nodes, cold and cached"),
    "faults": ("bench.faults", "training steps/s with one of 4 peers SIGKILLed every 10 s (replicas 2)"),
    "memory": ("bench.memory", "peak RSS of a peer per hosted expert, and of a client"),
    "hf_moe": ("bench.hf_moe", "decode and prefill tokens/s of a Hugging Face MoE over a local swarm vs run locally"),
    "relay": ("bench.relay", "p50 latency and training tokens/s through a libp2p relay (peer behind NAT) vs gRPC"),
}

"""A/B measurements of changes proposed for `peer/`, `router_client/` and `proto/` (not part of `dmoe bench`).

The changes are applied as patches to this checkout's code, so that their gain can be measured before anyone
writes them properly; they reach into private functions and may stop applying when those change.

* ``inline`` (peer): a batch of at most `INLINE_ELEMENTS` input elements is computed on the event loop itself
  instead of hopping to the compute thread and back (`peer.batching.BatchingQueue._run`).

(The ``rawcodec`` patch that was measured here is now `proto.wire`, used by every peer and client.)

    python -m bench.experiments --hidden 64 --tokens 16 --mode latency
    python -m bench.experiments --hidden 1024 --tokens 512 4096 --mode infer train

runs a baseline peer and a patched peer side by side and interleaves a baseline client with a patched one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

INLINE_ELEMENTS = 1 << 16
PATCHES = ("inline",)


def patch_peer(patches: set[str]) -> None:
    """Apply the peer-side patches in this (peer) process."""
    if "inline" in patches:
        from peer import batching

        async def _run(self):
            loop = asyncio.get_running_loop()
            while True:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                batch = self._next_batch()
                if not batch:
                    continue
                inputs = batching._concat([task.tensors for task in batch])
                try:
                    if sum(t.numel() for t in inputs) <= INLINE_ELEMENTS:
                        outputs = self.compute_fn(inputs, 0)
                    else:
                        outputs = await loop.run_in_executor(self.executor, self.compute_fn, inputs, 0)
                except Exception as exc:
                    for task in batch:
                        if not task.future.done():
                            task.future.set_exception(exc)
                    continue
                self.stats.record_batch(sum(task.num_tokens for task in batch))
                offset = 0
                for task in batch:
                    if not task.future.done():
                        task.future.set_result([t[offset : offset + task.num_tokens] for t in outputs])
                    offset += task.num_tokens

        batching.BatchingQueue._run = _run


def peer_main() -> int:
    """`python -m bench.experiments peer ...`: `dmoe peer` with the patches named in DMOE_PATCH."""
    patch_peer({p for p in os.environ.get("DMOE_PATCH", "").split(",") if p})
    from dmoe_cli.main import main

    return main(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16])
    parser.add_argument("--mode", nargs="+", default=["latency"], choices=("latency", "infer", "train"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patches", default="inline")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args(argv)

    import torch

    from bench.clients import dmoe_layer, make_gate
    from bench.common import Side, interleave, summarize, tune_allocator
    from bench.servers import DmoeGroup, start_all, stop_all

    tune_allocator()
    torch.set_num_threads(args.threads)
    patches = {p for p in args.patches.split(",") if p}
    pattern = [f"ffn.[0:{args.experts}]"]
    baseline = DmoeGroup("ab-base", pattern, hidden_dim=args.hidden, compute_threads=args.threads)
    launcher = [sys.executable, "-m", "bench.experiments", "peer"]
    os.environ["DMOE_PATCH"] = ",".join(sorted(patches))
    patched = DmoeGroup("ab-patched", pattern, hidden_dim=args.hidden, compute_threads=args.threads, launcher=launcher)
    try:
        start_all(baseline, patched)
        for mode in args.mode:
            fixed = (3, 5) if mode == "latency" else None
            gate = make_gate(args.hidden, args.experts, fixed=fixed)
            base_layer = dmoe_layer(
                baseline.initial_peers, args.hidden, "ffn", args.experts, 2, gate, timeout_after_k_min=120.0
            )
            new_layer = dmoe_layer(
                patched.initial_peers,
                args.hidden,
                "ffn",
                args.experts,
                2,
                gate,
                timeout_after_k_min=120.0,
                ban_max=60.000001,
            )  # its own transport
            for layer in (base_layer, new_layer):
                layer.train(mode == "train")
            for tokens in args.tokens:
                x = torch.randn(tokens, args.hidden)
                grad = torch.randn(tokens, args.hidden)

                def step(layer, x=x, grad=grad, mode=mode):
                    if mode == "train":
                        layer(x.clone().requires_grad_()).backward(grad)
                    else:
                        with torch.no_grad():
                            layer(x)

                reps = args.reps if mode == "latency" else max(3, args.reps // 20)
                sides = [
                    Side("baseline", lambda layer=base_layer: step(layer), reps=reps, warmup=3),
                    Side("patched", lambda layer=new_layer: step(layer), reps=reps, warmup=3),
                ]
                interleave(sides)
                base, new = (summarize(s.samples)["median"] for s in sides)
                print(
                    f"{mode} hidden {args.hidden} tokens {tokens}: baseline p50 {base * 1e3:.2f} ms, "
                    f"patched ({','.join(sorted(patches))}) p50 {new * 1e3:.2f} ms: x{base / new:.2f}",
                    flush=True,
                )
    finally:
        stop_all(baseline, patched)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.argv.pop(1)
        sys.exit(peer_main())
    sys.exit(main())

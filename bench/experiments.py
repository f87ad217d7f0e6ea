"""A/B measurements of changes proposed for `peer/`, `router_client/` and `proto/` (not part of `dmoe bench`).

The changes are applied as patches to this checkout's code, so that their gain can be measured before anyone
writes them properly; they reach into private functions and may stop applying when those change.

* ``inline`` (peer): a batch of at most `INLINE_ELEMENTS` input elements is computed on the event loop itself
  instead of hopping to the compute thread and back (`peer.batching.BatchingQueue._run`);
* ``rawcodec`` (peer and client): requests and responses of at least `RAW_MIN_BYTES` are written and read with
  `bench.fastcodec` (the same protobuf wire format, payload copied once on encode, zero times on decode)
  instead of protobuf objects (`peer.servicer.ExpertServicer._unary`, `router_client.transport.ExpertTransport.call`);
  smaller ones keep protobuf, whose C parser is faster than a Python walk of the wire format there.

    python -m bench.experiments --hidden 64 --tokens 16 --mode latency
    python -m bench.experiments --hidden 1024 --tokens 512 4096 --mode infer train

runs a baseline peer and a patched peer side by side and interleaves a baseline client with a patched one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import types

INLINE_ELEMENTS = 1 << 16
RAW_MIN_BYTES = 1 << 16  # below this, protobuf's C parser beats the pure-Python wire walk: keep protobuf
PATCHES = ("inline", "rawcodec")


def patch_peer(patches: set[str]) -> None:
    """Apply the peer-side patches in this (peer) process."""
    import torch

    from bench import fastcodec

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

    if "rawcodec" in patches:
        import grpc

        from peer import servicer as servicer_module
        from proto import expert_pb2, serialize_tensor

        original_unary = servicer_module.ExpertServicer._unary
        original_decode = servicer_module.ExpertServicer._decode

        async def _unary(self, request, context, *, backward):
            if len(request) < RAW_MIN_BYTES:
                return await original_unary(self, request, context, backward=backward)
            try:
                uid, tensors, compression = fastcodec.decode(request, request=True)
            except Exception:  # compressed, chunked or malformed: the protobuf path says what is wrong
                return await original_unary(self, request, context, backward=backward)
            try:
                outputs = await self._run(uid, tensors, context, backward=backward)
                if compression:
                    response = [serialize_tensor(t, compression) for t in outputs]
                    return expert_pb2.ExpertResponse(tensors=response).SerializeToString()
                return fastcodec.encode(outputs)
            except servicer_module.RequestError as exc:
                await context.abort(exc.code, str(exc))

        def _decode(self, uid, messages, specs):
            if not messages or not isinstance(messages[0], torch.Tensor):
                return original_decode(self, uid, messages, specs)
            error = servicer_module.RequestError
            if len(messages) != len(specs):
                raise error(grpc.StatusCode.INVALID_ARGUMENT, f"expert {uid} expects {len(specs)} tensors")
            batch = messages[0].shape[0] if messages[0].dim() else 0
            for tensor, spec in zip(messages, specs, strict=True):
                if tensor.dim() != len(spec.shape) + 1 or tuple(tensor.shape[1:]) != spec.shape:
                    raise error(grpc.StatusCode.INVALID_ARGUMENT, f"bad shape {list(tensor.shape)} for {uid}")
                if tensor.dtype != spec.dtype or tensor.shape[0] != batch:
                    raise error(grpc.StatusCode.INVALID_ARGUMENT, f"bad dtype or batch for {uid}")
            if not 0 < batch <= self.max_batch_size:
                raise error(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{batch} tokens for {uid}")
            return list(messages)

        servicer_module.ExpertServicer._unary = _unary
        servicer_module.ExpertServicer._decode = _decode


def patch_transport(transport) -> None:
    """Make this one `ExpertTransport` instance send and read raw-bytes messages (lossless, unary calls)."""
    import grpc

    from bench import fastcodec
    from router_client import transport as transport_module

    original = transport.call

    async def call(self, endpoint, uid, tensors, *, backward, timeout):
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.compression or not RAW_MIN_BYTES <= size < self.max_message_bytes * 0.9 or timeout <= 0:
            return await original(endpoint, uid, tensors, backward=backward, timeout=timeout)
        method = "/dmoe.v1.ExpertService/" + ("Backward" if backward else "Forward")
        try:
            response = await self.channel(endpoint).unary_unary(method)(
                fastcodec.encode(tensors, uid=uid), timeout=timeout, metadata=self.metadata
            )
            return fastcodec.decode(response, request=False)[1]
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            raise transport_module.ExpertCallError(endpoint, uid, reason, exc.code()) from None
        except Exception as exc:
            raise transport_module.ExpertCallError(endpoint, uid, f"malformed answer: {exc}") from None

    transport.call = types.MethodType(call, transport)


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
    parser.add_argument("--patches", default="inline,rawcodec")
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
            if "rawcodec" in patches:
                patch_transport(new_layer.dispatcher.transport)
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

"""`RemoteExpert`: one expert on one peer, called like a local module."""

from __future__ import annotations

import time

import torch
from torch import nn

from dht import ExpertReplica
from router_client import background
from router_client.autograd import DUMMY, new_forward_id
from router_client.config import RouterConfig
from router_client.dispatch import Dispatcher, ExpertJob
from router_client.moe import RemoteExpertError
from router_client.swarm_client import get_context


class RemoteExpert(nn.Module):
    """Expert `uid` hosted at `endpoint` ("host:port"), as an `nn.Module` with autograd.

    `forward(*inputs)` sends every input in one request and returns the expert's outputs (one tensor, or a
    tuple when the expert has several). The call, and the backward, each have a deadline
    (`forward_timeout`, `backward_timeout`); a failure or an anomalous answer raises `RemoteExpertError`
    naming the peer and the reason. The backward steps the expert's optimizer on the peer.
    """

    def __init__(self, uid: str, endpoint: str, *, config: RouterConfig | None = None, **router_options):
        super().__init__()
        self.uid, self.endpoint = uid, endpoint
        self.config = config or RouterConfig()
        if router_options:
            import dataclasses

            self.config = dataclasses.replace(self.config, **router_options)
        context = get_context(self.config)
        self.dispatcher = Dispatcher(context.transport, context.scores, check_outputs=self.config.check_outputs)
        self.replica = ExpertReplica(uid=uid, endpoint=endpoint, peer_id="", expiration_time=float("inf"))

    def forward(self, *inputs: torch.Tensor):
        """Outputs of the remote expert for `inputs` (the first dimension is the batch)."""
        outputs = _RemoteExpertCall.apply(DUMMY, self, new_forward_id(torch.is_grad_enabled()), *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def call(self, tensors: list[torch.Tensor], *, backward: bool, forward_id: int = 0) -> list[torch.Tensor]:
        """One raw Forward or Backward call with this expert's deadline; raises `RemoteExpertError`.

        A nonzero `forward_id` pairs a training Forward with its Backward (the peer may keep the graph).
        """
        timeout = self.config.backward_timeout if backward else self.config.forward_timeout
        batch = tensors[0].shape[0]
        job = ExpertJob(self.uid, torch.arange(batch), torch.zeros(batch, dtype=torch.int64))
        coro = self.dispatcher.run(
            [job],
            lambda _job: tensors,
            {self.uid: [self.replica]},
            backward=backward,
            deadline=time.monotonic() + timeout,
            required=torch.ones(batch, dtype=torch.int64),
            grace=0.0,
            expected_shapes=lambda _job: [],
            preferred=None,
            forward_id=forward_id,
        )
        try:
            (result,) = background.run(coro, timeout=timeout + 2.0)
        except TimeoutError as exc:
            raise RemoteExpertError(f"{self.uid}@{self.endpoint}: {exc}") from None
        if not result.ok:
            raise RemoteExpertError(f"{self.uid}@{self.endpoint} failed: {result.error}")
        return result.outputs


class _RemoteExpertCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, _dummy: torch.Tensor, expert: RemoteExpert, forward_id: int, *inputs: torch.Tensor):
        inputs = tuple(t.detach() for t in inputs)
        ctx.expert, ctx.forward_id = expert, forward_id
        ctx.save_for_backward(*inputs)
        return tuple(expert.call(list(inputs), backward=False, forward_id=ctx.forward_id))

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        inputs = ctx.saved_tensors
        grads = ctx.expert.call(
            [*inputs, *(g.contiguous() for g in grad_outputs)], backward=True, forward_id=ctx.forward_id
        )
        return (None, None, None, *grads)

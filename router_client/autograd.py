"""What the router's autograd bridges share: an input that always requires grad, and forward ids."""

from __future__ import annotations

import secrets

import torch

# Passed to every autograd bridge so the experts get their Backward (and train) even when the layer's own
# input does not require grad (hivemind's `DUMMY`, for the same reason).
DUMMY = torch.empty(0, requires_grad=True)


def new_forward_id(training: bool) -> int:
    """A random nonzero id for a Forward whose Backward will follow (`training`), else 0."""
    return secrets.randbits(63) + 1 if training else 0

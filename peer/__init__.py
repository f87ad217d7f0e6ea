"""The volunteer node: hosts experts, serves them over gRPC (`dmoe.v1.ExpertService`) and announces them."""

from peer.backend import ExpertBackend
from peer.checkpoints import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from peer.config import PeerConfig
from peer.experts import FeedForwardExpert, SwiGLUExpert, get_expert_class, register_expert_class
from peer.peer import Peer, run_peer

__all__ = [
    "CheckpointError",
    "ExpertBackend",
    "FeedForwardExpert",
    "Peer",
    "PeerConfig",
    "SwiGLUExpert",
    "atomic_write_bytes",
    "get_expert_class",
    "load_checkpoint",
    "register_expert_class",
    "run_peer",
    "save_checkpoint",
]

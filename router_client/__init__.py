"""The client side of dmoe: route tokens to remote experts, with deadlines, replicas and fallback."""

from router_client.config import RouterConfig, config_field
from router_client.expert import RemoteExpert
from router_client.moe import RemoteExpertError, RemoteMixtureOfExperts
from router_client.remote_experts import RemoteExperts, remote_expert_layers

__all__ = [
    "RemoteExpert",
    "RemoteExpertError",
    "RemoteExperts",
    "RemoteMixtureOfExperts",
    "RouterConfig",
    "config_field",
    "load_hf_model",
    "remote_expert_layers",
]


def __getattr__(name: str):
    # `load_hf_model` lives with the model families (models.hf_client, which imports this package): loaded on use
    if name == "load_hf_model":
        from models.hf_client import load_hf_model

        return load_hf_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

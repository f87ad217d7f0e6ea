"""The client side of dmoe: route tokens to remote experts, with deadlines, replicas and fallback."""

from router_client.config import RouterConfig, config_field
from router_client.expert import RemoteExpert
from router_client.moe import RemoteExpertError, RemoteMixtureOfExperts

__all__ = ["RemoteExpert", "RemoteExpertError", "RemoteMixtureOfExperts", "RouterConfig", "config_field"]

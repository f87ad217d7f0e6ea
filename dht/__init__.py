"""Expert records in the swarm's DHT: a supervised hivemind DHT node, the record layout, and the directory.

* `DHTNode`: a `hivemind.DHT` child process with a deadline on every call, restarted (same peer id) when it dies
  or hangs; failures surface as `DHTUnavailableError`.
* `ExpertDirectory`: peers `declare` the experts they host (one owner-signed record per uid and peer, plus grid
  prefix records); clients `get` replicas, `find_best_experts` by beam search over the grid, or `list_experts`,
  through a TTL cache; `read_grid_prefixes` (parsed `GridPrefix` records) and `search_grid` let a router run
  the same beam search on a parsed cache of its own.
* `make_record_validators` / `load_or_create_rsa_key`: what every node runs so that records are well-formed and
  only their owner can change them, and the persistent key a peer signs with.
* `parse_expert_pattern`, `is_valid_uid`, `split_uid`, `UID_DELIMITER`: expert uids like ``ffn.3.17``.
"""

import os

# hivemind switches torch to the file_system sharing strategy, which starts a torch_shm_manager daemon per
# process that outlives it; dmoe shares no tensors between processes, so keep torch's default.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from dht.startup import defer_unused_imports  # noqa: E402

defer_unused_imports()  # before the first hivemind import

from dht.beam_search import search_grid  # noqa: E402
from dht.directory import DirectoryStats, ExpertDirectory, ExpertReplica  # noqa: E402
from dht.grid import GridPrefix  # noqa: E402
from dht.identity import load_or_create_rsa_key  # noqa: E402
from dht.node import DHTNode, DHTUnavailableError  # noqa: E402
from dht.uids import UID_DELIMITER, is_valid_uid, parse_expert_pattern, split_uid  # noqa: E402
from dht.validation import ExpertRecordValidator, make_record_validators  # noqa: E402

__all__ = [
    "UID_DELIMITER",
    "DHTNode",
    "DHTUnavailableError",
    "DirectoryStats",
    "ExpertDirectory",
    "ExpertRecordValidator",
    "ExpertReplica",
    "GridPrefix",
    "is_valid_uid",
    "load_or_create_rsa_key",
    "make_record_validators",
    "parse_expert_pattern",
    "search_grid",
    "split_uid",
]

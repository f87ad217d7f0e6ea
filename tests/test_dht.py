"""The `dht` package against real hivemind DHT nodes on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import msgpack
import numpy as np
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dht import (
    UID_DELIMITER,
    DHTNode,
    DHTUnavailableError,
    ExpertDirectory,
    ExpertRecordValidator,
    calls,
    is_valid_uid,
    load_or_create_rsa_key,
    make_record_validators,
    parse_expert_pattern,
    split_uid,
)
from dht.records import expert_subkey, make_expert_value, make_row_value, owner_marker, prefix_subkey

# ---------------------------------------------------------------- fixtures


@contextmanager
def dht_node(**kwargs) -> Iterator[DHTNode]:
    """A real DHT node on 127.0.0.1, always shut down afterwards."""
    node = DHTNode(**kwargs)
    try:
        yield node
    finally:
        node.shutdown()


@dataclass
class Swarm:
    nodes: list[DHTNode]
    keys: list[RSAPrivateKey]
    directories: list[ExpertDirectory]

    @property
    def initial_peers(self) -> list[str]:
        return self.nodes[0].visible_maddrs()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    """Three honest DHT nodes, each signing with its own RSA key. Tests use distinct grid names."""
    keys = [RSAPrivateKey() for _ in range(3)]
    nodes: list[DHTNode] = []
    try:
        nodes.append(DHTNode(record_validators=make_record_validators(keys[0])))
        for key in keys[1:]:
            nodes.append(
                DHTNode(initial_peers=nodes[0].visible_maddrs(), record_validators=make_record_validators(key))
            )
        yield Swarm(nodes, keys, [ExpertDirectory(node, rsa_key=key) for node, key in zip(nodes, keys, strict=True)])
    finally:
        for node in nodes:
            node.shutdown()


@pytest.fixture
def client(swarm: Swarm) -> Iterator[DHTNode]:
    """A fourth node (client mode) joined to the swarm, for tests that shut it down."""
    with dht_node(initial_peers=swarm.initial_peers, client_mode=True) as node:
        yield node


@pytest.fixture
def rogue(swarm: Swarm) -> Iterator[DHTNode]:
    """A node that validates nothing and signs with a key of its own."""
    with dht_node(initial_peers=swarm.initial_peers, record_validators=()) as node:
        yield node


# ---------------------------------------------------------------- uids and patterns


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("ffn.3", ["ffn.3"]),
        ("ffn.[0:4]", ["ffn.0", "ffn.1", "ffn.2", "ffn.3"]),
        ("ffn.[0:2].[5:7]", ["ffn.0.5", "ffn.0.6", "ffn.1.5", "ffn.1.6"]),
        ("ffn.1.[0:2]", ["ffn.1.0", "ffn.1.1"]),
        ("ffn.0,ffn.1,ffn.7", ["ffn.0", "ffn.1", "ffn.7"]),
        (" ffn.0 , attn_x-2.[3:5] ", ["ffn.0", "attn_x-2.3", "attn_x-2.4"]),
        ("ffn.[0:2],ffn.1", ["ffn.0", "ffn.1"]),  # duplicates are dropped, order kept
        ("ffn.10.0", ["ffn.10.0"]),
    ],
)
def test_parse_expert_pattern(pattern, expected):
    assert parse_expert_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "  ",
        "ffn",
        "ffn.",
        ".3",
        "ffn.-1",
        "ffn.03",
        "ffn.x",
        "ffn.[4:2]",
        "ffn.[2:2]",
        "ffn.[0:4",
        "ffn.[0:a]",
        "ffn.0,,ffn.1",
        "ffn.0,",
        "ff n.0",
        "ffn.1.5]",
        "ffn.[0:1000000].[0:1000]",
    ],
)
def test_parse_expert_pattern_rejects_bad_patterns(pattern):
    with pytest.raises(ValueError):
        parse_expert_pattern(pattern)


def test_uids():
    assert UID_DELIMITER == "."
    assert is_valid_uid("ffn.3") and is_valid_uid("ffn.3.17") and is_valid_uid("a_b-c.0")
    for bad in ["ffn", "ffn.", "ffn.03", "ffn.-1", "ffn.3.", "f.n.3", "", None, 3, "ffn.3 "]:
        assert not is_valid_uid(bad), bad
    assert split_uid("ffn.3.17") == ("ffn", (3, 17))
    with pytest.raises(ValueError):
        split_uid("ffn.x")


# ---------------------------------------------------------------- record schema (validator unit checks)

SCHEMA_KEY = RSAPrivateKey()
SCHEMA_MARKER = owner_marker(SCHEMA_KEY.get_public_key().to_bytes())
PEER = "QmbQ7ocpHyeXuRKWWPdygxzP3vePPRsW2dgQMWVLu3m7H7"


def _record(subkey, value, expiration=None) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source="ffn.0").to_bytes(),
        subkey=msgpack.packb(subkey, use_bin_type=True),
        value=value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True),
        expiration_time=get_dht_time() + 60 if expiration is None else expiration,
    )


def _expert(**changes) -> dict:
    value = make_expert_value("127.0.0.1:5000", PEER, "ffn", {"queue_size": 1, "tokens_per_second": 2.0})
    value.update(changes)
    return value


MALFORMED = {
    "missing endpoint": (expert_subkey(PEER, SCHEMA_MARKER), {k: v for k, v in _expert().items() if k != "endpoint"}),
    "missing load": (expert_subkey(PEER, SCHEMA_MARKER), {k: v for k, v in _expert().items() if k != "load"}),
    "endpoint without port": (expert_subkey(PEER, SCHEMA_MARKER), _expert(endpoint="127.0.0.1")),
    "endpoint port 0": (expert_subkey(PEER, SCHEMA_MARKER), _expert(endpoint="127.0.0.1:0")),
    "endpoint not a string": (expert_subkey(PEER, SCHEMA_MARKER), _expert(endpoint=5000)),
    "queue_size as str": (
        expert_subkey(PEER, SCHEMA_MARKER),
        _expert(load={"queue_size": "3", "tokens_per_second": 1.0}),
    ),
    "queue_size negative": (
        expert_subkey(PEER, SCHEMA_MARKER),
        _expert(load={"queue_size": -1, "tokens_per_second": 1.0}),
    ),
    "tokens_per_second NaN": (
        expert_subkey(PEER, SCHEMA_MARKER),
        _expert(load={"queue_size": 0, "tokens_per_second": math.nan}),
    ),
    "huge expert_cls": (expert_subkey(PEER, SCHEMA_MARKER), _expert(expert_cls="x" * 10_000)),
    "peer_id differs from subkey": (expert_subkey(PEER, SCHEMA_MARKER), _expert(peer_id="QmOther1")),
    "value not a map": (expert_subkey(PEER, SCHEMA_MARKER), [1, 2, 3]),
    "undecodable value": (expert_subkey(PEER, SCHEMA_MARKER), b"\xc1\xff"),
    "plain value": (None, _expert()),
    "subkey without owner": (PEER, _expert()),
    "subkey not a string": (7, _expert()),
    "prefix record with bad uid": (prefix_subkey(3, PEER, SCHEMA_MARKER), {"uid": "ffn.x"}),
    "prefix record for another coordinate": (prefix_subkey(3, PEER, SCHEMA_MARKER), {"uid": "ffn.4"}),
}


def test_schema_accepts_well_formed_records():
    validator = ExpertRecordValidator()
    assert validator.validate(_record(expert_subkey(PEER, SCHEMA_MARKER), _expert()))
    assert validator.validate(_record(prefix_subkey(3, PEER, SCHEMA_MARKER), {"uid": "ffn.3.17"}))
    assert validator.validate(_record(expert_subkey(PEER, SCHEMA_MARKER), _expert(endpoint="[::1]:80", extra=1)))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_schema_rejects_malformed_records(case):
    subkey, value = MALFORMED[case]
    assert not ExpertRecordValidator().validate(_record(subkey, value))


def test_schema_rejects_records_that_live_too_long():
    assert not ExpertRecordValidator().validate(
        _record(expert_subkey(PEER, SCHEMA_MARKER), _expert(), expiration=get_dht_time() + 365 * 86400)
    )


# ---------------------------------------------------------------- declare and look up


def test_declared_expert_is_found_from_another_node(swarm: Swarm):
    declarer, reader = swarm.directories[0], swarm.directories[2]
    stored = declarer.declare(
        ["found.0", "found.1"],
        "127.0.0.1:5001",
        expert_cls="ffn",
        load={"found.1": {"queue_size": 3, "tokens_per_second": 12.5}},
    )
    assert stored == {"found.0": True, "found.1": True}
    replicas = reader.get(["found.0", "found.1", "found.2"], use_cache=False)
    assert [r.endpoint for r in replicas["found.0"]] == ["127.0.0.1:5001"]
    assert replicas["found.2"] == []
    [replica] = replicas["found.1"]
    assert (replica.uid, replica.peer_id, replica.expert_cls) == ("found.1", swarm.nodes[0].peer_id, "ffn")
    assert (replica.queue_size, replica.tokens_per_second) == (3, 12.5)
    assert 50 < replica.expiration_time - get_dht_time() <= 60


def test_two_peers_hosting_one_uid_are_both_returned(swarm: Swarm):
    assert swarm.directories[0].declare(["twin.0"], "127.0.0.1:6000") == {"twin.0": True}
    assert swarm.directories[1].declare(["twin.0"], "127.0.0.1:6001") == {"twin.0": True}
    for directory in swarm.directories:
        replicas = directory.get(["twin.0"], use_cache=False)["twin.0"]
        assert sorted(r.endpoint for r in replicas) == ["127.0.0.1:6000", "127.0.0.1:6001"]
        assert {r.peer_id for r in replicas} == {swarm.nodes[0].peer_id, swarm.nodes[1].peer_id}


def test_a_withdrawn_replica_disappears_at_once_and_a_new_declaration_brings_it_back(swarm: Swarm):
    uids = ["gone.0.1", "gone.1.0"]
    swarm.directories[0].declare(uids, "127.0.0.1:6100")
    swarm.directories[1].declare(["gone.0.1"], "127.0.0.1:6101")
    reader = swarm.directories[2]
    scores = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    assert reader.find_best_experts("gone", scores, 2, use_cache=False) == [["gone.0.1", "gone.1.0"]]

    assert swarm.directories[0].withdraw(uids, "127.0.0.1:6100") == {uid: True for uid in uids}
    found = reader.get(uids, use_cache=False)
    assert [r.endpoint for r in found["gone.0.1"]] == ["127.0.0.1:6101"], "the other replica stays"
    assert found["gone.1.0"] == []
    assert sorted(reader.list_experts("gone", use_cache=False)) == ["gone.0.1"]
    assert reader.find_best_experts("gone", scores, 2, use_cache=False) == [["gone.0.1"]]

    swarm.directories[0].declare(uids, "127.0.0.1:6100")  # the same peer again (a restart with its identity)
    found = reader.get(uids, use_cache=False)
    assert sorted(r.endpoint for r in found["gone.0.1"]) == ["127.0.0.1:6100", "127.0.0.1:6101"]
    assert [r.endpoint for r in found["gone.1.0"]] == ["127.0.0.1:6100"]


@pytest.mark.slow
def test_records_expire_independently(swarm: Swarm):
    reader = ExpertDirectory(swarm.nodes[2], cache_ttl=60.0)  # a long TTL: expiry must still be exact
    swarm.directories[0].declare(["short.0"], "127.0.0.1:7000", expiration=2.0)
    swarm.directories[1].declare(["short.0"], "127.0.0.1:7001", expiration=30.0)
    assert len(reader.get(["short.0"])["short.0"]) == 2
    time.sleep(2.5)
    rounds = reader.stats.dht_rounds
    assert [r.endpoint for r in reader.get(["short.0"])["short.0"]] == ["127.0.0.1:7001"]  # from the cache
    assert reader.stats.dht_rounds == rounds
    assert [r.endpoint for r in reader.get(["short.0"], use_cache=False)["short.0"]] == ["127.0.0.1:7001"]


def test_declare_rejects_bad_arguments(swarm: Swarm):
    directory = swarm.directories[0]
    with pytest.raises(ValueError):
        directory.declare(["ffn.x"], "127.0.0.1:5000")
    with pytest.raises(ValueError):
        directory.declare(["ok.0"], "no-port")
    with pytest.raises(TypeError):
        directory.declare("ok.0", "127.0.0.1:5000")
    with pytest.raises(ValueError):
        ExpertDirectory(swarm.nodes[0], rsa_key=swarm.keys[1])  # not the key that node signs with
    assert directory.declare([], "127.0.0.1:5000") == {}


def test_large_declaration_goes_through_the_command_pipe(swarm: Swarm):
    # ~300 signed records, a command far above the 16 KiB that broke hivemind's own pipe reader
    uids = parse_expert_pattern("big.[0:16].[0:16]")
    assert all(swarm.directories[0].declare(uids, "127.0.0.1:5002").values())
    found = swarm.directories[1].get(uids, use_cache=False)
    assert all(len(found[uid]) == 1 for uid in uids)


def test_async_api(swarm: Swarm):
    async def scenario():
        stored = await swarm.directories[0].declare(["aio.0.1", "aio.1.0"], "127.0.0.1:8000", return_future=True)
        found = await swarm.directories[1].get(["aio.0.1"], use_cache=False, return_future=True)
        best = await swarm.directories[1].find_best_experts(
            "aio", [np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])], 2, return_future=True
        )
        listed = await swarm.directories[2].list_experts("aio", return_future=True)
        return stored, found, best, listed

    stored, found, best, listed = asyncio.run(scenario())
    assert stored == {"aio.0.1": True, "aio.1.0": True}
    assert [r.endpoint for r in found["aio.0.1"]] == ["127.0.0.1:8000"]
    assert best == [["aio.1.0", "aio.0.1"]]
    assert sorted(listed) == ["aio.0.1", "aio.1.0"]


# ---------------------------------------------------------------- beam search


def _brute_force(uids: list[str], grid_scores: list[np.ndarray], k: int) -> list[list[str]]:
    coords = {uid: split_uid(uid)[1] for uid in uids}
    return [
        sorted(uids, key=lambda uid: -sum(s[q, c] for s, c in zip(grid_scores, coords[uid], strict=True)))[:k]
        for q in range(grid_scores[0].shape[0])
    ]


def test_beam_search_1d_finds_the_best_live_experts(swarm: Swarm):
    rng = np.random.default_rng(1)
    live = [f"beam1.{i}" for i in sorted(rng.choice(16, size=9, replace=False))]
    half = len(live) // 2
    swarm.directories[0].declare(live[:half], "127.0.0.1:9000")
    swarm.directories[1].declare(live[half:], "127.0.0.1:9001")
    scores = [rng.normal(size=(32, 16))]
    for k in (1, 3, 9, 12):
        assert swarm.directories[2].find_best_experts("beam1", scores, k) == _brute_force(live, scores, k)


def test_beam_search_2d_finds_the_best_live_experts(swarm: Swarm):
    rng = np.random.default_rng(2)
    grid = list(itertools.product(range(8), range(8)))
    live = sorted(f"beam2.{i}.{j}" for i, j in (grid[n] for n in rng.choice(64, size=40, replace=False)))
    swarm.directories[0].declare(live[::2], "127.0.0.1:9100")
    swarm.directories[1].declare(live[1::2], "127.0.0.1:9101")
    scores = [rng.normal(size=(64, 8)), rng.normal(size=(64, 8))]
    reader = swarm.directories[2]
    # exact when the beam holds every live first coordinate
    assert reader.find_best_experts("beam2", scores, 4, beam_size=8) == _brute_force(live, scores, 4)
    # with a narrow beam: live uids, best first, never better than the exact answer
    narrow = reader.find_best_experts("beam2.", scores, 4, beam_size=2)
    exact = _brute_force(live, scores, 4)
    for q, uids in enumerate(narrow):
        assert len(uids) == 4 and set(uids) <= set(live)
        got = [sum(s[q, c] for s, c in zip(scores, split_uid(uid)[1], strict=True)) for uid in uids]
        best = [sum(s[q, c] for s, c in zip(scores, split_uid(uid)[1], strict=True)) for uid in exact[q]]
        assert got == sorted(got, reverse=True) and all(g <= b + 1e-12 for g, b in zip(got, best, strict=True))
    # scores for absent grids or dimensions give no experts
    assert reader.find_best_experts("nothing", scores, 4) == [[]] * 64
    assert reader.find_best_experts("beam2", scores[:1], 4) == [[]] * 64  # beam2 is 2-d


def test_beam_search_costs_one_round_per_level_then_none(swarm: Swarm):
    swarm.directories[0].declare([f"rounds.{i}.{j}" for i in range(4) for j in range(4)], "127.0.0.1:9200")
    reader = ExpertDirectory(swarm.nodes[2])
    scores = [np.random.default_rng(3).normal(size=(256, 4)) for _ in range(2)]
    reader.find_best_experts("rounds", scores, 2)
    assert reader.stats.dht_rounds == 2  # one per grid level, for all 256 queries together
    reader.find_best_experts("rounds", scores, 2)
    assert reader.stats.dht_rounds == 2  # served from the cache


def test_list_experts(swarm: Swarm):
    swarm.directories[0].declare(["listed.0.0", "listed.0.1", "listed.3.2"], "127.0.0.1:9300")
    swarm.directories[1].declare(["listed.3.2"], "127.0.0.1:9301")
    listed = swarm.directories[2].list_experts("listed")
    assert sorted(listed) == ["listed.0.0", "listed.0.1", "listed.3.2"]
    assert sorted(r.endpoint for r in listed["listed.3.2"]) == ["127.0.0.1:9300", "127.0.0.1:9301"]


# ---------------------------------------------------------------- cache


def test_cached_lookup_does_not_touch_the_dht(swarm: Swarm, client: DHTNode):
    swarm.directories[0].declare(["cached.0"], "127.0.0.1:9400")
    directory = ExpertDirectory(client, cache_ttl=30.0)
    first = directory.get(["cached.0", "cached.1"])
    assert directory.stats.dht_rounds == 1
    client.shutdown()  # from now on any DHT call would raise DHTUnavailableError
    assert directory.get(["cached.0", "cached.1"]) == first
    assert directory.stats.dht_rounds == 1 and directory.stats.cache_hits == 1  # both uids live under "cached."
    with pytest.raises(DHTUnavailableError):
        directory.get(["cached.0"], use_cache=False)


def test_stale_cache_entry_is_refreshed_after_the_ttl(swarm: Swarm):
    reader = ExpertDirectory(swarm.nodes[2], cache_ttl=0.5)
    swarm.directories[0].declare(["stale.0"], "127.0.0.1:9500")
    assert len(reader.get(["stale.0"])["stale.0"]) == 1
    swarm.directories[1].declare(["stale.0"], "127.0.0.1:9501")
    assert len(reader.get(["stale.0"])["stale.0"]) == 1  # within the TTL: the cached answer
    time.sleep(0.6)
    assert len(reader.get(["stale.0"])["stale.0"]) == 2
    assert reader.stats.dht_rounds == 2


# ---------------------------------------------------------------- signatures: a rogue node


async def _rogue_store(dht, node, key: str, subkey, value: bytes, expiration_time: float, sign: bool = False):
    """Inside the rogue's DHT process: send one raw record to every other node; returns their verdicts."""
    key_id = DHTID.generate(source=key)
    if sign:  # sign with the rogue's own RSA validator (it only signs sub-keys that carry its own marker)
        record = DHTRecord(key_id.to_bytes(), node.protocol.serializer.dumps(subkey), value, expiration_time)
        value = node.protocol.record_validator.sign_value(record)
    nearest = await node.find_nearest_nodes([key_id], k_nearest=20, exclude_self=True)
    verdicts = []
    for peer_id in nearest[key_id].values():
        response = await node.protocol.call_store(peer_id, [key_id], [value], [expiration_time], subkeys=[subkey])
        verdicts.append(None if response is None else response[0])
    return verdicts


def test_rogue_node_can_neither_overwrite_nor_erase_a_signed_record(swarm: Swarm, rogue: DHTNode):
    owner = swarm.directories[0]
    assert owner.declare(["guarded.0"], "127.0.0.1:9600") == {"guarded.0": True}
    [original] = swarm.directories[1].get(["guarded.0"], use_cache=False)["guarded.0"]
    victim_subkey = expert_subkey(swarm.nodes[0].peer_id, owner_marker(swarm.keys[0].get_public_key().to_bytes()))
    forged_value = make_row_value(["guarded.0"], make_expert_value("6.6.6.6:666", swarm.nodes[0].peer_id))
    forged = msgpack.packb(forged_value, use_bin_type=True)
    later = get_dht_time() + 600
    other_key = RSAPrivateKey()
    forged_signature = RSASignatureValidator.SIGNATURE_FORMAT.replace(b"_value_", other_key.sign(forged))
    attacks = {
        "overwrite, unsigned, later expiration": (victim_subkey, forged),
        "overwrite, signed by another key": (victim_subkey, forged + forged_signature),
        "erase with a plain value": (None, msgpack.packb("gone")),
        "erase with a None value": (victim_subkey, msgpack.packb(None)),
    }
    for attack, (subkey, value) in attacks.items():
        verdicts = rogue.run(partial(_rogue_store, key="guarded.", subkey=subkey, value=value, expiration_time=later))
        assert len(verdicts) >= 3 and not any(verdicts), attack  # every honest node refused
    for directory in swarm.directories:
        assert directory.get(["guarded.0"], use_cache=False)["guarded.0"] == [original]


def test_honest_nodes_reject_malformed_values(swarm: Swarm):
    # a rogue that signs correctly with its own key but skips the schema
    rogue_key = RSAPrivateKey()
    with dht_node(initial_peers=swarm.initial_peers, record_validators=[RSASignatureValidator(rogue_key)]) as rogue:
        marker = owner_marker(rogue_key.get_public_key().to_bytes())
        subkey = expert_subkey(rogue.peer_id, marker)
        expiration = get_dht_time() + 60
        good = make_row_value(["malformed.0"], make_expert_value("127.0.0.1:9700", rogue.peer_id))
        store = partial(_rogue_store, key="malformed.", subkey=subkey, expiration_time=expiration, sign=True)
        bad_values = {
            "missing field": {k: v for k, v in good.items() if k != "endpoint"},
            "wrong type": {**good, "load": {"queue_size": "many", "tokens_per_second": 1.0}},
            "endpoint not host:port": {**good, "endpoint": "somewhere"},
            "absurd size": {**good, "expert_cls": "x" * 5000},
            "row coords not ints": {**good, "coords": ["0"]},
            "row uid not among its coords": {**good, "coords": [1]},
        }
        for case, value in bad_values.items():
            verdicts = rogue.run(partial(store, value=msgpack.packb(value, use_bin_type=True)))
            assert len(verdicts) >= 3 and not any(verdicts), case
        assert swarm.directories[2].get(["malformed.0"], use_cache=False)["malformed.0"] == []
        # control: the same rogue's well-formed record is accepted (it may host its own replica)
        verdicts = rogue.run(partial(store, value=msgpack.packb(good, use_bin_type=True)))
        assert len(verdicts) >= 3 and all(verdicts)
        [replica] = swarm.directories[2].get(["malformed.0"], use_cache=False)["malformed.0"]
        assert replica.endpoint == "127.0.0.1:9700"


def test_rsa_key_file_keeps_ownership_across_restarts(swarm: Swarm, tmp_path):
    key_path, identity_path = tmp_path / "keys" / "dht.pem", str(tmp_path / "identity.key")
    key = load_or_create_rsa_key(key_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    common = dict(initial_peers=swarm.initial_peers, identity_path=identity_path)
    with dht_node(record_validators=make_record_validators(key), **common) as node:
        assert ExpertDirectory(node, rsa_key=key).declare(["owned.0"], "127.0.0.1:9800") == {"owned.0": True}
        peer_id = node.peer_id
    key_again = load_or_create_rsa_key(key_path)
    assert key_again.get_public_key().to_bytes() == key.get_public_key().to_bytes()
    with dht_node(record_validators=make_record_validators(key_again), **common) as node:
        assert node.peer_id == peer_id
        assert ExpertDirectory(node).declare(["owned.0"], "127.0.0.1:9801") == {"owned.0": True}
    [replica] = swarm.directories[2].get(["owned.0"], use_cache=False)["owned.0"]
    assert replica.endpoint == "127.0.0.1:9801"  # the same record, replaced by its owner


def test_rsa_key_file_rejects_garbage(tmp_path):
    path = tmp_path / "bad.pem"
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError):
        load_or_create_rsa_key(path)


# ---------------------------------------------------------------- DHTNode supervision


async def _fail(dht, node):
    raise KeyError("from inside the DHT process")


async def _sleep(dht, node, seconds: float):
    await asyncio.sleep(seconds)


@pytest.mark.slow
def test_killed_dht_process_raises_then_is_restarted(tmp_path):
    with dht_node(identity_path=str(tmp_path / "id.key"), health_check_period=60.0) as node:
        peer_id, maddrs = node.peer_id, node.visible_maddrs()
        old_pid = node.run(calls.ping)
        os.kill(old_pid, signal.SIGKILL)
        node.process.join(5)
        started = time.monotonic()
        with pytest.raises(DHTUnavailableError, match="died"):
            node.run(calls.ping, timeout=2.0)
        assert time.monotonic() - started < 1.0  # no waiting on a dead process
        new_pid = node.run(calls.ping, timeout=30.0)  # waits for the background restart
        assert new_pid != old_pid and node.restarts == 1 and node.is_alive()
        assert node.peer_id == peer_id and node.visible_maddrs() == maddrs


@pytest.mark.slow
def test_hung_dht_process_times_out_then_is_restarted():
    with dht_node(health_check_period=60.0) as node:
        old_pid = node.run(calls.ping)
        os.kill(old_pid, signal.SIGSTOP)  # alive but unresponsive; the restart kills it
        with pytest.raises(DHTUnavailableError, match="did not answer"):
            node.run(calls.ping, timeout=1.0)
        assert node.run(calls.ping, timeout=30.0) != old_pid and node.restarts == 1


@pytest.mark.slow
def test_monitor_restarts_a_dead_process_without_any_call():
    with dht_node(health_check_period=0.2) as node:
        old_pid = node.run(calls.ping)
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while node.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.restarts == 1 and node.run(calls.ping) != old_pid


def test_calls_slow_exceptions_and_shutdown():
    with dht_node() as node:
        with pytest.raises(KeyError, match="from inside"):
            node.run(_fail)
        with pytest.raises(DHTUnavailableError, match="timed out"):
            node.run(partial(_sleep, seconds=5.0), timeout=0.5)  # slow, yet healthy: no restart
        assert node.restarts == 0 and node.run(calls.ping) == node.process.pid
        assert asyncio.run(node.arun(calls.ping)) == node.process.pid
        started = time.monotonic()
        node.shutdown()
        node.shutdown()
        assert time.monotonic() - started < 5.0 and not node.is_alive()
        with pytest.raises(DHTUnavailableError, match="shut down"):
            node.run(calls.ping)


def test_identity_path_keeps_the_peer_id(tmp_path):
    identity = tmp_path / "identity.key"
    with dht_node(identity_path=str(identity)) as node:
        peer_id = node.peer_id
        assert node.visible_maddrs()[0].endswith(f"/p2p/{peer_id}")
    assert identity.exists()
    with dht_node(identity_path=str(identity)) as node:
        assert node.peer_id == peer_id


def test_start_failures_say_what_to_check(tmp_path):
    with pytest.raises(ValueError, match=r"bad initial peer '127.0.0.1:1': expected a multiaddr like /ip4/HOST"):
        DHTNode(initial_peers=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="bad initial peer .*/p2p/PEER_ID"):
        DHTNode(initial_peers=["/ip4/127.0.0.1/tcp/1"])  # no peer id
    garbage = tmp_path / "identity.key"
    garbage.write_bytes(b"not a key")
    with pytest.raises(ValueError, match=f"{garbage} is not a libp2p identity file"):
        DHTNode(identity_path=str(garbage))
    unreachable = "/ip4/127.0.0.1/tcp/1/p2p/QmXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
    with pytest.raises(DHTUnavailableError, match="none of the initial peers answered") as info:
        DHTNode(initial_peers=[unreachable], start_attempts=1)
    assert unreachable in str(info.value) and "\n" not in str(info.value)

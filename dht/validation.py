"""Record validators that every honest dmoe DHT node runs on every record it stores or receives.

Two validators, combined by hivemind's `CompositeValidator`:

* `RSASignatureValidator` (hivemind, priority 10): a record whose sub-key carries ``[owner:<public key>]`` must
  be signed by that key. It signs outgoing records of the local key, checks signatures of incoming ones and
  strips the signature before the record reaches the next validator or the application.
* `ExpertRecordValidator` (this module, priority 0, so it runs after the signature check on the stripped
  value): the schema of `dht.records`. Keys reach validators only as hashes, so the schema cannot be tied to
  "expert keys"; instead it applies to the whole DHT: a dmoe DHT holds only owner-signed, sub-keyed dmoe
  records. That rule is what makes records impossible to erase: in hivemind a plain (non-dictionary) value with
  a later expiration replaces a whole dictionary key, so plain values must be refused everywhere.

Together, another node can add its own (signed) replica under a uid but can neither overwrite nor erase
someone else's record. Limits: a peer's RSA key is not tied to its libp2p peer id, so the ``peer_id`` field is
a claim made by the key owner; clients should trust what a peer's endpoint answers, not the record alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dht.records import MAX_EXPIRATION_SECONDS, MAX_SUBKEY_CHARS, MAX_VALUE_BYTES, check_record

logger = logging.getLogger(__name__)


class ExpertRecordValidator(RecordValidatorBase):
    """Accepts only well-formed dmoe records: sub-keyed, owner-marked, bounded in size and lifetime.

    Rejected: plain values (no sub-key), sub-keys that are not ``[<coord>:]<peer_id>[owner:…]``, values that
    are not valid expert or prefix records (see `dht.records`), values over `MAX_VALUE_BYTES`, and records
    expiring more than `max_expiration` seconds from now. Must run after `RSASignatureValidator` (which
    `make_record_validators` arranges), because it reads the value with the signature stripped.
    """

    def __init__(self, max_expiration: float = MAX_EXPIRATION_SECONDS):
        self.max_expiration = max_expiration

    def validate(self, record: DHTRecord) -> bool:
        """True if `record` is a well-formed dmoe record (see the class docstring)."""
        reason = self._reject_reason(record)
        if reason is not None:
            logger.debug("rejected a DHT record: %s", reason)
            return False
        return True

    def _reject_reason(self, record: DHTRecord) -> str | None:
        if record.expiration_time > get_dht_time() + self.max_expiration:
            return f"expires {record.expiration_time - get_dht_time():.0f} s from now (max {self.max_expiration})"
        if len(record.value) > MAX_VALUE_BYTES:
            return f"value of {len(record.value)} bytes (max {MAX_VALUE_BYTES})"
        if len(record.subkey) > MAX_SUBKEY_CHARS + 8:
            return f"sub-key of {len(record.subkey)} bytes"
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False)
            value = msgpack.unpackb(record.value, raw=False)
        except Exception as exc:  # any malformed msgpack (ValueError, ExtraData, FormatError, ...)
            return f"undecodable record ({exc!r:.80})"
        if subkey is None:
            return "plain (non-dictionary) values are not allowed in a dmoe DHT"
        return check_record(subkey, value)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Absorb another instance (keeping the stricter lifetime limit) so the check runs once."""
        if not isinstance(other, ExpertRecordValidator):
            return False
        self.max_expiration = min(self.max_expiration, other.max_expiration)
        return True


def make_record_validators(rsa_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """The validators every dmoe DHT node must run: the owner-signature check and the record schema.

    `rsa_key` signs this node's records (see `load_or_create_rsa_key`); None uses hivemind's process-wide key.
    Pass the result as ``DHTNode(record_validators=...)`` and give the same key to `ExpertDirectory`.
    """
    return [RSASignatureValidator(rsa_key), ExpertRecordValidator()]


def signing_owner_marker(validators: Iterable[RecordValidatorBase]) -> str | None:
    """The ``[owner:…]`` marker of the first `RSASignatureValidator` in `validators` (the key that signs), if any."""
    for validator in validators:
        if isinstance(validator, RSASignatureValidator):
            return validator.local_public_key.decode("ascii")
    return None

"""Persistent RSA keys that sign a peer's DHT records, so a restarted peer still owns them."""

from __future__ import annotations

import logging
import os
import stat
import tempfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


def load_or_create_rsa_key(path: str | os.PathLike) -> RSAPrivateKey:
    """Load the RSA private key stored at `path` (PEM, PKCS#8), creating it with mode 0600 if it is missing.

    The owner marker in a record's subkey is derived from this key: a peer that restarts with the same key
    file renews (and can replace) its own records, whereas any other key cannot touch them.
    Creation is atomic: concurrent callers on the same path all end up with the same key.
    Raises ValueError if the file exists but does not hold an unencrypted RSA private key.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        _create_key_file(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        logger.warning("RSA key file %s is readable by other users (mode %o); chmod 600 it", path, mode)
    with open(path, "rb") as file:
        data = file.read()
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} does not hold an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} holds a {type(private_key).__name__}, not an RSA private key")
    return _wrap(private_key)


def _create_key_file(path: str) -> None:
    """Write a fresh key to a temporary file and link it into place unless someone else was faster."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    pem = RSAPrivateKey()._private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    fd, tmp_path = tempfile.mkstemp(prefix=".rsa-key-", dir=directory)  # mkstemp creates it with mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp_path, path)
            logger.info("created a new RSA key for signing DHT records at %s", path)
        except FileExistsError:
            pass  # another process created it first; use theirs
    finally:
        os.unlink(tmp_path)


def _wrap(private_key: rsa.RSAPrivateKey) -> RSAPrivateKey:
    """Wrap a `cryptography` key in hivemind's RSAPrivateKey (which has no public constructor for that)."""
    wrapped = RSAPrivateKey.__new__(RSAPrivateKey)
    wrapped._private_key = private_key
    return wrapped

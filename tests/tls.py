"""A certificate authority and a server certificate for 127.0.0.1, made at test time (trustme,
as tests/sfserver.py's), so that the tests' PostgreSQL, MariaDB and Redis serve TLS as a
managed service does."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certificates:
    ca: Path  # what a client trusts (sslrootcert, ssl_ca)
    cert: Path  # the server's certificate, signed by the CA
    key: Path  # the server's private key (mode 0600)


def make_certificates(directory: Path, *, owner: str | None = None) -> Certificates:
    """A CA and a certificate for 127.0.0.1 and localhost; `owner`: who owns the key
    (PostgreSQL refuses a key its own user cannot read, or that others can)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    found = Certificates(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca.cert_pem.write_to_path(str(found.ca))
    server.cert_chain_pems[0].write_to_path(str(found.cert))
    server.private_key_pem.write_to_path(str(found.key))
    os.chmod(found.key, 0o600)
    if owner is not None:
        for path in (found.ca, found.cert, found.key):
            shutil.chown(path, owner, owner)
    return found

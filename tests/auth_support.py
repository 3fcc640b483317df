"""Credentials for the auth tests: a secret, API keys, key pairs and token makers.

Key pairs are made by the ``openssl`` command, so that the tests use the
``cryptography`` package only through PyJWT, as the server does.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstu"
API_KEY = "pk-live-7c1d0b9e5a4f4e2a8b6c3d1e0f9a8b7c"
OTHER_API_KEY = "pk-live-0000aaaa1111bbbb2222cccc3333dddd"


def token(sub: str = "alice", subscribe: list[str] | None = None,
          publish: list[str] | None = None, *, ttl: float = 3600, key: Any = SECRET,
          algorithm: str = "HS256", **extra: Any) -> str:
    """A signed JWT; ``extra`` claims are added (a value of None removes the claim)."""
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl),
                              "squall": {"subscribe": subscribe or [], "publish": publish or []}}
    claims.update(extra)
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def unsigned_token(sub: str = "alice", subscribe: list[str] | None = None) -> str:
    """An ``alg: none`` token granting ``subscribe``: must always be refused."""
    header = _b64({"alg": "none", "typ": "JWT"})
    body = _b64({"sub": sub, "exp": int(time.time() + 3600),
                 "squall": {"subscribe": subscribe or [">"], "publish": [">"]}})
    return f"{header}.{body}."


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes
    public_path: Path
    private_path: Path


def make_key_pair(folder: Path, name: str, *options: str) -> KeyPair:
    """A new key pair by ``openssl genpkey`` (e.g. ``-algorithm RSA``), saved in ``folder``."""
    private_path = folder / f"{name}.key"
    public_path = folder / f"{name}.pub.pem"
    subprocess.run(["openssl", "genpkey", *options, "-out", str(private_path)], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["openssl", "pkey", "-in", str(private_path), "-pubout", "-out",
                    str(public_path)], check=True, capture_output=True, timeout=60)
    return KeyPair(private_path.read_bytes(), public_path.read_bytes(), public_path,
                   private_path)


RSA = ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
EC_P256 = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
EC_P384 = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384")

"""Ed25519 signatures of a bundle's manifest (optional; needs the ``cryptography`` package, the
``sign`` extra). ``manifest.json`` records the sha256 and size of every other file, so signing
its exact bytes covers the whole bundle; the signature is ``manifest.sig`` beside it:

    {"format": "nnforge.signature", "algorithm": "ed25519", "key_id": "<16 hex digits>",
     "manifest_sha256": "<hex>", "signature": "<base64>"}

``key_id`` is the start of the sha256 of the raw public key, so a mismatch can say which key
signed. Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo public): bytes, text, a path to a PEM
file, or a ``cryptography`` key object.

    >>> priv, pub = generate_keypair()
    >>> sign("bundles/mlp-onnx", priv)
    >>> check_signature(Path("bundles/mlp-onnx"), Path("bundles/mlp-onnx/manifest.json").read_bytes(), pub)
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .format import MANIFEST, SIGNATURE, BundleError, check_files, parse_manifest, read_manifest_bytes

SIG_FORMAT = "nnforge.signature"
MAX_SIGNATURE_BYTES = 1 << 16


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("signing bundles needs the cryptography package: pip install 'nnforge[sign]'") from None
    return serialization, ed25519


def _pem(key) -> bytes:
    if isinstance(key, bytes):
        return key
    text = os.fspath(key) if isinstance(key, os.PathLike) else key
    if isinstance(text, str) and text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    if isinstance(text, str):
        path = Path(text)
        if not path.is_file():
            raise BundleError(f"key file {path} does not exist")
        return path.read_bytes()
    raise BundleError(f"a key must be PEM bytes or text, a path to a PEM file or a cryptography key, "
                      f"not {type(key).__name__}")


def load_private_key(key, password: bytes | None = None):
    """An Ed25519 private key from PEM bytes/text, a PEM file path, or a key object."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    try:
        k = serialization.load_pem_private_key(_pem(key), password=password)
    except (ValueError, TypeError) as e:
        raise BundleError(f"cannot read the private key: {e}") from None
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise BundleError(f"bundles are signed with Ed25519 keys, not {type(k).__name__}")
    return k


def load_public_key(key):
    """An Ed25519 public key from PEM bytes/text, a PEM file path, or a key object (a private key
    gives its public half)."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    try:
        k = serialization.load_pem_public_key(_pem(key))
    except (ValueError, TypeError) as e:
        raise BundleError(f"cannot read the public key: {e}") from None
    if not isinstance(k, ed25519.Ed25519PublicKey):
        raise BundleError(f"bundles are signed with Ed25519 keys, not {type(k).__name__}")
    return k


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a new Ed25519 key pair, unencrypted: store the private one
    safely (``openssl genpkey -algorithm ed25519`` makes the same kind of key)."""
    serialization, ed25519 = _crypto()
    k = ed25519.Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def sign(path: str | Path, private_key, *, password: bytes | None = None) -> Path:
    """Sign the bundle at ``path``: its files are checked against the manifest first (a damaged
    bundle is not signed), then ``manifest.sig`` is written (atomically; an old one is replaced).
    Returns the signature's path.

        >>> sign("bundles/mlp-onnx", Path("release.pem").read_bytes())
    """
    root = Path(path)
    manifest = parse_manifest(root, read_manifest_bytes(root))
    problems = check_files(root, manifest)
    if problems:
        raise BundleError(f"bundle {root}: refusing to sign a bundle that fails its integrity check: "
                          + "; ".join(problems))
    key = load_private_key(private_key, password)
    data = read_manifest_bytes(root)
    record = {"format": SIG_FORMAT, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
              "manifest_sha256": hashlib.sha256(data).hexdigest(),
              "signature": base64.b64encode(key.sign(data)).decode()}
    out = root / SIGNATURE
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE}.tmp-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=1))
        os.replace(tmp, out)             # a link planted at manifest.sig is replaced, not followed
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def read_signature(root: Path) -> dict | None:
    """The parsed ``manifest.sig`` of a bundle, or None when it is unsigned."""
    path = root / SIGNATURE
    if path.is_symlink():
        raise BundleError(f"bundle {root}: refusing {SIGNATURE}: it is a symbolic link")
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BundleError(f"bundle {root}: {SIGNATURE} is not a signature file")
    try:
        record = json.loads(path.read_bytes())
    except ValueError as e:
        raise BundleError(f"bundle {root}: {SIGNATURE} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != SIG_FORMAT or record.get("algorithm") != "ed25519":
        raise BundleError(f"bundle {root}: {SIGNATURE} is not an nnforge ed25519 signature")
    return record


def check_signature(root: Path, manifest_bytes: bytes, public_key) -> dict:
    """Raise BundleError unless ``manifest.sig`` is a valid signature of ``manifest_bytes`` by
    ``public_key``; returns ``{"key_id": ..., "algorithm": "ed25519"}``."""
    key = load_public_key(public_key)
    from cryptography.exceptions import InvalidSignature
    record = read_signature(root)
    if record is None:
        raise BundleError(f"bundle {root} is not signed ({SIGNATURE} is missing) but a key was given")
    mine = key_id(key)
    if record.get("key_id") != mine:
        raise BundleError(f"bundle {root}: {SIGNATURE} was made with key {record.get('key_id')}, "
                          f"not with the given key {mine}")
    try:
        sig = base64.b64decode(str(record.get("signature", "")), validate=True)
        key.verify(sig, manifest_bytes)
    except (InvalidSignature, ValueError):
        raise BundleError(f"bundle {root}: {MANIFEST} does not match its signature {SIGNATURE} (key {mine}): "
                          "the manifest was changed after signing") from None
    return {"key_id": mine, "algorithm": "ed25519"}


__all__ = ["sign", "check_signature", "read_signature", "generate_keypair", "load_private_key", "load_public_key",
           "key_id"]

"""Ed25519 keys that sign update manifests: generate, save, load, sign, and the public key devices trust."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from testbed.core.errors import TestbedError

PUBLIC_KEY_PREFIX = "ed25519:"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 16 * 1024


class SigningKeyError(TestbedError):
    """A key file or public key text that cannot be used (missing, unreadable, not an Ed25519 key)."""


@dataclass(frozen=True)
class TrustedKey:
    """The public half devices check signatures with; written as `ed25519:<base64 of the 32 raw bytes>`."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise SigningKeyError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(self.raw)}")

    @property
    def text(self) -> str:
        return PUBLIC_KEY_PREFIX + base64.b64encode(self.raw).decode("ascii")

    @property
    def key_id(self) -> str:
        """A short name for logs: the first 8 base64 characters of the key."""
        return self.text[len(PUBLIC_KEY_PREFIX):][:8]

    @classmethod
    def from_text(cls, text: str) -> TrustedKey:
        """Parse `ed25519:<base64>`; SigningKeyError saying what is wrong otherwise."""
        if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX) or len(text) > 128:
            raise SigningKeyError(f"a public key is written {PUBLIC_KEY_PREFIX}<base64 of 32 bytes>, got {str(text)[:80]!r}")
        try:
            raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise SigningKeyError(f"public key {text[:80]!r} is not valid base64") from None
        return cls(raw)

    @classmethod
    def from_argument(cls, value: str) -> TrustedKey:
        """A public key given on a command line: the `ed25519:...` text itself, or a file holding it."""
        if value.startswith(PUBLIC_KEY_PREFIX):
            return cls.from_text(value)
        path = Path(value)
        try:
            if path.stat().st_size > MAX_KEY_FILE_BYTES:
                raise SigningKeyError(f"{path}: too large to be a public key file")
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise SigningKeyError(f"cannot read public key {value!r}: {getattr(error, 'strerror', None) or error} "
                                  f"(give {PUBLIC_KEY_PREFIX}<base64> or a file that holds it)") from None
        return cls.from_text(text.splitlines()[0] if text else "")

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's Ed25519 signature of `message`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """The private key a run signs its manifests with (fresh per run unless a key file is given)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.trusted_key = TrustedKey(private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """A key written by `save` (PKCS#8 PEM); SigningKeyError naming the file otherwise."""
        try:
            if Path(path).stat().st_size > MAX_KEY_FILE_BYTES:
                raise SigningKeyError(f"{path}: too large to be a signing key file")
            data = Path(path).read_bytes()
        except OSError as error:
            raise SigningKeyError(f"cannot read signing key {path}: {error.strerror or error}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({error}); "
                                  "make one with `testbed keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 key; "
                                  "make one with `testbed keygen`")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by its owner only; refuses to overwrite a file."""
        pem = self._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SigningKeyError(f"{path} exists; not overwriting a key (remove it or choose another name)") from None
        except OSError as error:
            raise SigningKeyError(f"cannot write {path}: {error.strerror or error}") from None
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

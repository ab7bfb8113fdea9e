"""Ed25519 signatures for bundles, task parts and device anti-rollback.

Device side (DESIGN.md rules 1 and 3): stdlib plus ``cryptography``, never torch. The
``cryptography`` package is imported inside the functions that need it, so importing
this module works without it; using it then raises :class:`SigningError` saying
"install cryptography".

What gets signed is always a domain-separated message, so a signature made for one
purpose can never be replayed as another:

* a manifest: ``b"edgecl-manifest\\0" + canonical_body`` (:func:`manifest_message`);
* a task part: ``b"edgecl-part\\0" + name + b"\\0" + sha256`` (:func:`part_message`), so a
  device signs each task it learns and the host can tell which device produced it.

A signature is a small JSON-able dict ``{"alg": "ed25519", "key": KEY_ID, "sig": BASE64}``.

Key files:

* private key: PKCS8 PEM, unencrypted, mode 0600 (written by :func:`generate_key`);
* public key (``*.pub``): one line ``ed25519 <base64 of the 32 raw bytes> <name>``.

A trust store is a directory of ``*.pub`` files (``$EDGECL_TRUST_STORE``); it also keeps
the highest version seen per bundle (``seen-versions.json``) so a version never goes
backwards on a device.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BundleError, EdgeclError

try:  # POSIX only (every device we target); without it the state file is simply unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ALG = "ed25519"
MANIFEST_DOMAIN = b"edgecl-manifest\0"
PART_DOMAIN = b"edgecl-part\0"
SIGNING_KEY_ENV = "EDGECL_SIGNING_KEY"
TRUST_STORE_ENV = "EDGECL_TRUST_STORE"
STATE_FILE_NAME = "seen-versions.json"
PUB_SUFFIX = ".pub"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- errors


class SigningError(EdgeclError):
    """A key, a trust store or the signing set-up itself is unusable (names the file)."""

    def __init__(self, path: object | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{self.path}: {reason}")


class SignatureError(BundleError):
    """A bundle's signature or version is refused. ``kind`` says why; ``path`` names the file.

    Subclasses per kind let callers catch one case; ``kind`` lets them switch on a string.
    """

    kind = "signature"


class UnsignedError(SignatureError):
    kind = "unsigned"


class UnknownKeyError(SignatureError):
    kind = "unknown-key"


class BadSignatureError(SignatureError):
    kind = "bad-signature"


class ReplayError(SignatureError):
    kind = "replay"


# ----------------------------------------------------------------------------- helpers


def _ed25519(where: object | None) -> Any:
    """The ``cryptography`` Ed25519 module, imported on first use (the device may lack it)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise SigningError(where, "Ed25519 signatures need the 'cryptography' package: install "
                                  f"cryptography (pip install cryptography) ({e})") from e
    return ed25519


def key_id(public_raw: bytes) -> str:
    """First 16 hex chars of sha256 of the 32 raw public-key bytes: short, stable, printable."""
    if len(public_raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 raw bytes, got {len(public_raw)}")
    return hashlib.sha256(public_raw).hexdigest()[:16]


def manifest_message(canonical_body: bytes) -> bytes:
    """The bytes a manifest signature covers: a domain prefix, then the canonical body."""
    return MANIFEST_DOMAIN + bytes(canonical_body)


def part_message(name: str, sha256: str) -> bytes:
    """The bytes a task-part signature covers. Raises ValueError on an ambiguous input.

    NUL separates the fields, so a NUL inside the name would make two inputs sign alike;
    the hash must be lowercase hex so one file has exactly one signable spelling.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"part name must be a non-empty string without NUL, got {name!r}")
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"part sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return PART_DOMAIN + name.encode() + b"\0" + sha256.encode()


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _check_name(name: str) -> str:
    # The name is the rest of the .pub line: it may hold spaces, not line breaks.
    if not name.strip() or any(c in name for c in "\r\n\0\t"):
        raise ValueError(f"key name must be a non-empty single line, got {name!r}")
    return name.strip()


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; never overwrite (O_EXCL), never leave a partial file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits we want (0644 for the .pub)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def public_key_path(path: Path) -> Path:
    """Where :func:`generate_key` puts the public half of the private key at ``path``."""
    return Path(path).with_suffix(PUB_SUFFIX)


# ----------------------------------------------------------------------------- keys


def generate_key(path: Path, *, name: str | None = None) -> str:
    """Write a new Ed25519 key pair: ``path`` (private, PKCS8 PEM, 0600) and its ``.pub`` (0644).

    Refuses to overwrite either file: losing a signing key would orphan every device
    that trusts it. Returns the key id.
    """
    path = Path(path)
    pub_path = public_key_path(path)
    if pub_path == path:
        raise SigningError(path, f"the private key file must not end in {PUB_SUFFIX}: its public "
                                 "half is written next to it with that suffix")
    if name is not None:
        try:
            name = _check_name(name)
        except ValueError as e:
            raise SigningError(path, str(e)) from None
    for p in (path, pub_path):
        if p.exists() or p.is_symlink():
            raise SigningError(p, "already exists; refusing to overwrite a key (move it away or "
                                  "choose another path)")
    if not path.parent.is_dir():
        raise SigningError(path.parent, "no such directory for the new key")
    ed25519 = _ed25519(path)
    from cryptography.hazmat.primitives import serialization

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(raw)
    line = f"{ALG} {base64.b64encode(raw).decode('ascii')} {name or kid}\n".encode()
    try:
        _create_exclusive(path, pem, 0o600)
    except FileExistsError:
        raise SigningError(path, "already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise SigningError(path, f"cannot write the private key ({e.strerror or e})") from e
    try:
        _create_exclusive(pub_path, line, 0o644)
    except OSError as e:
        path.unlink(missing_ok=True)  # no private key without its public half
        if isinstance(e, FileExistsError):
            raise SigningError(pub_path, "already exists; refusing to overwrite a key") from None
        raise SigningError(pub_path, f"cannot write the public key ({e.strerror or e})") from e
    return kid


class SigningKey:
    """An Ed25519 private key loaded from a PKCS8 PEM file (host, or a device that signs parts)."""

    def __init__(self, private: Any, path: Path | None = None) -> None:
        from cryptography.hazmat.primitives import serialization

        self._private = private
        self.path = path
        self.public_raw: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id: str = key_id(self.public_raw)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        path = Path(path).expanduser()
        ed25519 = _ed25519(path)
        from cryptography.hazmat.primitives import serialization

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SigningError(path, "no such signing key file") from None
        except IsADirectoryError:
            raise SigningError(path, "is a directory, not a signing key file") from None
        except OSError as e:
            raise SigningError(path, f"cannot read the signing key ({e.strerror or e})") from e
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # encrypted: we write and expect unencrypted keys (devices have no tty)
            raise SigningError(path, "the private key is encrypted; edgecl needs an unencrypted "
                                     "PKCS8 PEM Ed25519 key (edgecl keygen)") from None
        except Exception as e:  # ValueError, UnsupportedAlgorithm: not a key we can read
            raise SigningError(path, "not a PEM Ed25519 private key (make one with edgecl keygen; "
                                     f"a .pub file is the public half) ({type(e).__name__})") from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise SigningError(path, f"is a {type(private).__name__.lstrip('_')} PEM key, not an "
                                     "Ed25519 private key")
        return cls(private, path)

    @classmethod
    def from_env(cls) -> SigningKey | None:
        """The key at ``$EDGECL_SIGNING_KEY``, or None when it is unset or empty."""
        value = os.environ.get(SIGNING_KEY_ENV, "").strip()
        return cls.load(Path(value)) if value else None

    def sign(self, data: bytes) -> dict:
        """Sign an already-built message (see :func:`manifest_message`, :func:`part_message`)."""
        sig = self._private.sign(bytes(data))
        return {"alg": ALG, "key": self.key_id, "sig": base64.b64encode(sig).decode("ascii")}

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, path={str(self.path)!r})"


def sign_manifest(key: SigningKey, canonical_body: bytes) -> dict:
    """The signature of a manifest's canonical body (domain-prefixed)."""
    return key.sign(manifest_message(canonical_body))


def sign_part(key: SigningKey, name: str, sha256: str) -> dict:
    """The signature of one task part: its name and the sha256 of its file."""
    return key.sign(part_message(name, sha256))


# ----------------------------------------------------------------------------- trust store


def _parse_pub(path: Path) -> tuple[bytes, str]:
    """(raw 32 bytes, name) from a ``.pub`` file; SigningError naming it when malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SigningError(path, f"cannot read the public key ({e})") from e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    expected = "expected one line 'ed25519 <base64 of 32 bytes> <name>' (as edgecl keygen writes)"
    if len(lines) != 1:
        raise SigningError(path, f"malformed public key: {len(lines)} key lines; {expected}")
    fields = lines[0].split(maxsplit=2)
    if len(fields) < 2 or fields[0] != ALG:
        raise SigningError(path, f"malformed public key: {expected}")
    try:
        raw = _b64decode(fields[1])
    except (binascii.Error, ValueError):
        raise SigningError(path, f"malformed public key: the key is not valid base64; {expected}") from None
    if len(raw) != 32:
        raise SigningError(path, f"malformed public key: {len(raw)} bytes, an Ed25519 key is 32")
    return raw, fields[2] if len(fields) == 3 else key_id(raw)


class TrustStore:
    """The public keys a device trusts (every ``*.pub`` in ``keys_dir``) and its version state.

    An empty or missing directory is an error rather than "trust nothing, refuse all":
    a misconfigured path should be reported as such, not as a signature failure.
    """

    def __init__(self, keys_dir: Path, state_file: Path | None = None) -> None:
        self.keys_dir = Path(keys_dir).expanduser()
        self.state_file = Path(state_file) if state_file is not None else self.keys_dir / STATE_FILE_NAME
        if not self.keys_dir.exists():
            raise SigningError(self.keys_dir, "no such trust store directory")
        if not self.keys_dir.is_dir():
            raise SigningError(self.keys_dir, "the trust store must be a directory of *.pub files")
        ed25519 = _ed25519(self.keys_dir)
        self._public: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        for pub in sorted(self.keys_dir.glob(f"*{PUB_SUFFIX}")):
            raw, name = _parse_pub(pub)
            kid = key_id(raw)
            if kid in self.keys:  # the same key twice (a copy under another name) is harmless
                continue
            try:
                self._public[kid] = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as e:
                raise SigningError(pub, f"malformed public key: not a valid Ed25519 key ({e})") from e
            self.keys[kid] = name
        if not self.keys:
            raise SigningError(self.keys_dir, "the trust store holds no *.pub key; a trust store with "
                                              "no key trusts nothing (add the signer's .pub file)")

    @classmethod
    def from_env(cls, state_file: Path | None = None) -> TrustStore | None:
        """The trust store at ``$EDGECL_TRUST_STORE``, or None when it is unset or empty. Its
        version record is ``$EDGECL_TRUST_STATE`` when set (for a read-only key directory
        such as /etc/edgecl/trust), else inside the key directory."""
        value = os.environ.get(TRUST_STORE_ENV, "").strip()
        state = state_file or (os.environ.get("EDGECL_TRUST_STATE", "").strip() or None)
        return cls(Path(value), None if state is None else Path(state)) if value else None

    def __repr__(self) -> str:
        return f"TrustStore({str(self.keys_dir)!r}, keys={sorted(self.keys)})"

    # -- signatures

    def verify(self, data: bytes, signature: dict | None, where: Path, *,
               what: str = "the manifest") -> str:
        """Check ``signature`` over the already-built message ``data``; return the signer's key id.

        ``where`` (the manifest path) is named in every error; ``what`` says what was
        signed, for the bad-signature message.
        """
        if signature is None:
            raise UnsignedError(where, f"unsigned: {what} carries no signature and the trust store at "
                                       f"{self.keys_dir} requires one")
        if not isinstance(signature, dict):
            raise BadSignatureError(where, f"malformed signature (a {type(signature).__name__}, "
                                           "expected {'alg', 'key', 'sig'})")
        alg, kid, sig_b64 = signature.get("alg"), signature.get("key"), signature.get("sig")
        if alg != ALG:
            raise BadSignatureError(where, f"unsupported signature algorithm {alg!r} (this runtime "
                                           f"verifies {ALG!r})")
        if not isinstance(kid, str) or not isinstance(sig_b64, str):
            raise BadSignatureError(where, "malformed signature: 'key' and 'sig' must be strings")
        if kid not in self._public:
            raise UnknownKeyError(where, f"signed by key {kid} which the trust store at {self.keys_dir} "
                                         "does not hold")
        try:
            sig = _b64decode(sig_b64)
        except (binascii.Error, ValueError):
            raise BadSignatureError(where, "malformed signature: 'sig' is not valid base64") from None
        if len(sig) != 64:
            raise BadSignatureError(where, f"malformed signature: 'sig' is {len(sig)} bytes, an Ed25519 "
                                           "signature is 64")
        from cryptography.exceptions import InvalidSignature

        try:
            self._public[kid].verify(sig, bytes(data))
        except InvalidSignature:
            raise BadSignatureError(where, f"signature does not verify: {what} was modified after "
                                           f"signing (key {kid})") from None
        return kid

    def verify_manifest(self, canonical_body: bytes, signature: dict | None, where: Path) -> str:
        """Verify a manifest signature (made by :func:`sign_manifest`); return the key id."""
        return self.verify(manifest_message(canonical_body), signature, where)

    def verify_part(self, name: str, sha256: str, signature: dict | None, where: Path) -> str:
        """Verify a task part's signature (made by :func:`sign_part`); return the signer's key id."""
        try:
            message = part_message(name, sha256)
        except ValueError as e:
            raise BadSignatureError(where, f"cannot verify part {name!r}: {e}") from None
        return self.verify(message, signature, where, what=f"part {name!r} (sha256 {sha256[:12]}…)")

    # -- anti-rollback

    def seen_versions(self) -> dict[str, int]:
        """The highest version recorded per bundle id (empty when none was recorded yet)."""
        return self._read_state()

    def check_version(self, bundle_id: str, version: int, where: Path, *,
                      allow_rollback: bool = False) -> None:
        """Refuse a version lower than the highest seen for ``bundle_id``; record this one.

        With ``allow_rollback`` the lower version is accepted and recorded, so the device
        does not then refuse the bundle it was deliberately rolled back to.
        """
        if not isinstance(bundle_id, str) or not bundle_id:
            raise BundleError(where, f"bundle id must be a non-empty string, got {bundle_id!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise BundleError(where, f"bundle version must be a non-negative integer, got {version!r}")
        with self._locked():
            state = self._read_state()
            seen = state.get(bundle_id)
            if seen is not None and version < seen and not allow_rollback:
                raise ReplayError(where, f"version {version} of bundle {bundle_id!r} is older than "
                                         f"version {seen} already seen on this device (state "
                                         f"{self.state_file}); a version never goes backwards "
                                         "(allow_rollback to roll back deliberately)")
            if seen != version:  # unchanged: no write (flash wear, read-only loads)
                state[bundle_id] = version
                self._write_state(state)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on a sibling lock file: two processes never interleave read+write."""
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SigningError(lock_path, f"cannot open the version-state lock ({e.strerror or e}); "
                                          "pass a writable state_file to TrustStore") from e
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read_state(self) -> dict[str, int]:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise SigningError(self.state_file, f"cannot read the version state ({e.strerror or e})") from e
        # Never reset a corrupt state silently: an empty state would accept any old version.
        try:
            state = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SigningError(self.state_file, f"version state is corrupt ({e}); it records the highest "
                                                "version seen per bundle, so restore or delete it "
                                                "knowingly") from e
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in state.items()):
            raise SigningError(self.state_file, "version state is corrupt: expected a JSON object "
                                                "{bundle_id: version}")
        return state

    def _write_state(self, state: dict[str, int]) -> None:
        """Atomic: temp file in the same directory, fsync, os.replace, fsync of the directory."""
        directory = self.state_file.parent
        data = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.state_file.name}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise SigningError(self.state_file, f"cannot write the version state ({e.strerror or e}); "
                                                "pass a writable state_file to TrustStore") from e
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise SigningError(self.state_file, f"cannot write the version state "
                                                    f"({e.strerror or e})") from e
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a power cut
        finally:
            os.close(dfd)

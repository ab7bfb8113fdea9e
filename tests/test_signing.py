"""Ed25519 signing: keys, trust store, manifest and part signatures, anti-rollback, keygen."""

from __future__ import annotations

import argparse
import ast
import base64
import json
import os
import stat
from pathlib import Path

import pytest

from edgecl.runtime import signing
from edgecl.runtime.errors import BundleError, EdgeclError
from edgecl.runtime.signing import (
    BadSignatureError,
    ReplayError,
    SignatureError,
    SigningError,
    SigningKey,
    TrustStore,
    UnknownKeyError,
    UnsignedError,
    generate_key,
    key_id,
    manifest_message,
    part_message,
    sign_manifest,
    sign_part,
)
from edgecl.tools import keys_cmd

BODY = b'{"format":"edgecl-bundle","tasks":[],"version":3}'
SHA = "ab" * 32


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs made once: 'host' (trusted) and 'other' (not in the trust store)."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("host", "other"):
        (root / name).mkdir()
        kid = generate_key(root / name / f"{name}.key", name=name)
        out[name] = (root / name / f"{name}.key", kid)
    return out


@pytest.fixture
def store_dir(tmp_path, keys):
    d = tmp_path / "trust"
    d.mkdir()
    pub = keys["host"][0].with_suffix(".pub")
    (d / pub.name).write_bytes(pub.read_bytes())
    return d


@pytest.fixture
def host(keys) -> SigningKey:
    return SigningKey.load(keys["host"][0])


# ----------------------------------------------------------------------------- keys


def test_generate_key_files_and_modes(tmp_path):
    old = os.umask(0o077)  # a strict umask must not make the .pub unreadable to the runtime
    try:
        kid = generate_key(tmp_path / "dev.key", name="build server")
    finally:
        os.umask(old)
    priv, pub = tmp_path / "dev.key", tmp_path / "dev.pub"
    assert _mode(priv) == 0o600 and _mode(pub) == 0o644
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    alg, b64, name = pub.read_text().rstrip("\n").split(" ", 2)
    raw = base64.b64decode(b64)
    assert (alg, name, len(raw)) == ("ed25519", "build server", 32)
    assert kid == key_id(raw) == SigningKey.load(priv).key_id and len(kid) == 16
    # without a name the key id labels the public key
    kid2 = generate_key(tmp_path / "anon")
    assert (tmp_path / "anon.pub").read_text().split()[2] == kid2


def test_generate_key_refuses_to_overwrite(tmp_path):
    generate_key(tmp_path / "k")
    before = (tmp_path / "k").read_bytes(), (tmp_path / "k.pub").read_bytes()
    with pytest.raises(SigningError, match="already exists") as e:
        generate_key(tmp_path / "k")
    assert str(tmp_path / "k") in str(e.value)
    assert ((tmp_path / "k").read_bytes(), (tmp_path / "k.pub").read_bytes()) == before
    # an existing .pub alone is refused too, and no private key is left behind
    (tmp_path / "lone.pub").write_text("keep me\n")
    with pytest.raises(SigningError, match="already exists") as e:
        generate_key(tmp_path / "lone.key")
    assert str(tmp_path / "lone.pub") in str(e.value)
    assert not (tmp_path / "lone.key").exists() and (tmp_path / "lone.pub").read_text() == "keep me\n"
    with pytest.raises(SigningError, match=r"must not end in \.pub") as e:
        generate_key(tmp_path / "x.pub")
    assert str(tmp_path / "x.pub") in str(e.value)


def test_load_signing_key_errors(tmp_path, keys):
    with pytest.raises(SigningError, match="no such signing key file") as e:
        SigningKey.load(tmp_path / "missing.key")
    assert str(tmp_path / "missing.key") in str(e.value)
    pub = keys["host"][0].with_suffix(".pub")  # the classic mistake: the public half
    with pytest.raises(SigningError, match="not a PEM Ed25519 private key") as e:
        SigningKey.load(pub)
    assert str(pub) in str(e.value)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SigningError, match="not an Ed25519 private key") as e:
        SigningKey.load(ec_key)
    assert str(ec_key) in str(e.value)


def test_from_env(monkeypatch, keys, store_dir):
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(signing.TRUST_STORE_ENV, raising=False)
    assert SigningKey.from_env() is None and TrustStore.from_env() is None
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(keys["host"][0]))
    monkeypatch.setenv(signing.TRUST_STORE_ENV, str(store_dir))
    assert SigningKey.from_env().key_id == keys["host"][1]
    assert TrustStore.from_env().keys == {keys["host"][1]: "host"}


def test_missing_cryptography_is_a_clear_error(monkeypatch, tmp_path):
    # the module imports without cryptography; using it says what to install
    tree = ast.parse(Path(signing.__file__).read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not top & {"cryptography", "torch"}
    monkeypatch.setitem(__import__("sys").modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(SigningError, match="install cryptography") as e:
        generate_key(tmp_path / "k")
    assert str(tmp_path / "k") in str(e.value)


# ----------------------------------------------------------------------------- verify


def test_sign_verify_round_trip(host, keys, store_dir):
    store = TrustStore(store_dir)
    assert store.keys == {keys["host"][1]: "host"}
    sig = sign_manifest(host, BODY)
    assert sig["alg"] == "ed25519" and sig["key"] == keys["host"][1]
    assert len(base64.b64decode(sig["sig"])) == 64
    assert json.loads(json.dumps(sig)) == sig  # it goes into a JSON manifest
    assert store.verify_manifest(BODY, sig, Path("b/manifest.json")) == keys["host"][1]
    assert store.verify(manifest_message(BODY), host.sign(manifest_message(BODY)), Path("m")) == host.key_id


def test_tampered_manifest_is_bad_signature(host, store_dir, tmp_path):
    store, where = TrustStore(store_dir), tmp_path / "bundle" / "manifest.json"
    sig = sign_manifest(host, BODY)
    with pytest.raises(BadSignatureError, match="modified after signing") as e:
        store.verify_manifest(BODY.replace(b"3", b"4"), sig, where)
    assert e.value.kind == "bad-signature" and isinstance(e.value, SignatureError)
    assert isinstance(e.value, BundleError) and e.value.path == str(where) and str(where) in str(e.value)
    # a flipped signature byte, a garbled signature, a foreign algorithm: all refused
    raw = bytearray(base64.b64decode(sig["sig"]))
    raw[0] ^= 1
    for bad in (dict(sig, sig=base64.b64encode(bytes(raw)).decode()), dict(sig, sig="not base64!"),
                dict(sig, sig=base64.b64encode(bytes(raw[:10])).decode()),
                dict(sig, alg="rsa"), "a string"):
        with pytest.raises(BadSignatureError) as e:
            store.verify_manifest(BODY, bad, where)
        assert str(where) in str(e.value)
    # domain separation: a manifest signature is not a valid signature of the raw body
    with pytest.raises(BadSignatureError):
        store.verify(BODY, sig, where)


def test_unknown_key(keys, store_dir, tmp_path):
    other = SigningKey.load(keys["other"][0])
    where = tmp_path / "manifest.json"
    with pytest.raises(UnknownKeyError) as e:
        TrustStore(store_dir).verify_manifest(BODY, sign_manifest(other, BODY), where)
    msg = str(e.value)
    assert e.value.kind == "unknown-key" and str(where) in msg
    assert f"signed by key {other.key_id} which the trust store at {store_dir} does not hold" in msg


def test_unsigned(store_dir, tmp_path):
    where = tmp_path / "manifest.json"
    with pytest.raises(UnsignedError, match="unsigned") as e:
        TrustStore(store_dir).verify_manifest(BODY, None, where)
    assert e.value.kind == "unsigned" and str(where) in str(e.value)


@pytest.mark.parametrize("content, reason", [
    ("", "0 key lines"),
    ("ssh-ed25519 AAAA host\n", "malformed public key"),
    ("ed25519 %%%% host\n", "not valid base64"),
    ("ed25519 " + base64.b64encode(b"x" * 31).decode() + " host\n", "31 bytes"),
    ("ed25519 a b\ned25519 c d\n", "2 key lines"),
])
def test_malformed_pub_is_named(store_dir, content, reason):
    bad = store_dir / "broken.pub"
    bad.write_text(content)
    with pytest.raises(SigningError, match=reason) as e:
        TrustStore(store_dir)
    assert str(bad) in str(e.value)


def test_empty_or_missing_trust_store_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("not a key")
    with pytest.raises(SigningError, match="trusts nothing") as e:
        TrustStore(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(SigningError, match="no such trust store") as e:
        TrustStore(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    assert isinstance(e.value, EdgeclError)  # the CLI prints it as a user error


def test_part_signatures_name_the_device(keys, store_dir, tmp_path):
    host, device = SigningKey.load(keys["host"][0]), SigningKey.load(keys["other"][0])
    (store_dir / "device.pub").write_bytes(keys["other"][0].with_suffix(".pub").read_bytes())
    store = TrustStore(store_dir)
    where = tmp_path / "tasks" / "t3.safetensors"
    assert store.verify_part("t3", SHA, sign_part(device, "t3", SHA), where) == device.key_id
    assert store.verify_part("t3", SHA, sign_part(host, "t3", SHA), where) == host.key_id
    sig = sign_part(device, "t3", SHA)
    for name, sha in (("t4", SHA), ("t3", "cd" * 32)):  # another part, another file
        with pytest.raises(BadSignatureError, match="part 't") as e:
            store.verify_part(name, sha, sig, where)
        assert str(where) in str(e.value)
    # a part signature is never a manifest signature, and ambiguous inputs are refused
    with pytest.raises(BadSignatureError):
        store.verify_manifest(part_message("t3", SHA)[len(b"edgecl-manifest\0"):], sig, where)
    with pytest.raises(ValueError):
        sign_part(device, "a\0b", SHA)
    with pytest.raises(BadSignatureError, match="64 lowercase hex") as e:
        store.verify_part("t3", SHA.upper(), sig, where)
    assert str(where) in str(e.value)


# ----------------------------------------------------------------------------- anti-rollback


def test_replay_refused_and_allowed_with_rollback(store_dir, tmp_path):
    store, where = TrustStore(store_dir), tmp_path / "b" / "manifest.json"
    state = store_dir / "seen-versions.json"
    store.check_version("bundle-a", 5, where)
    store.check_version("bundle-a", 5, where)  # the same version again: a reload, fine
    store.check_version("bundle-b", 1, where)  # another bundle has its own counter
    assert json.loads(state.read_text()) == {"bundle-a": 5, "bundle-b": 1}
    with pytest.raises(ReplayError) as e:
        store.check_version("bundle-a", 4, where)
    msg = str(e.value)
    assert e.value.kind == "replay" and str(where) in msg and "version 4" in msg and "version 5" in msg
    assert json.loads(state.read_text())["bundle-a"] == 5  # a refused version is not recorded
    store.check_version("bundle-a", 4, where, allow_rollback=True)
    assert TrustStore(store_dir).seen_versions()["bundle-a"] == 4  # the rollback is the new floor
    store.check_version("bundle-a", 4, where)
    with pytest.raises(ReplayError):
        store.check_version("bundle-a", 3, where)


def test_state_file_elsewhere_and_atomic(store_dir, tmp_path, monkeypatch):
    state = tmp_path / "var" / "state.json"
    state.parent.mkdir()
    store, where = TrustStore(store_dir, state_file=state), tmp_path / "manifest.json"
    store.check_version("b", 1, where)
    assert json.loads(state.read_text()) == {"b": 1}
    assert not (store_dir / "seen-versions.json").exists()
    assert (state.parent / "state.json.lock").exists()
    before = state.read_bytes()

    def crash(src, dst):  # a crash at the rename: the old state must survive intact
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(signing.os, "replace", crash)
    with pytest.raises(SigningError, match="No space left") as e:
        store.check_version("b", 2, where)
    assert str(state) in str(e.value)
    assert state.read_bytes() == before
    assert sorted(p.name for p in state.parent.iterdir()) == ["state.json", "state.json.lock"]


def test_corrupt_state_is_not_reset(store_dir, tmp_path):
    state = store_dir / "seen-versions.json"
    state.write_text("{not json")
    with pytest.raises(SigningError, match="corrupt") as e:
        TrustStore(store_dir).check_version("b", 1, tmp_path / "manifest.json")
    assert str(state) in str(e.value)
    assert state.read_text() == "{not json"


# ----------------------------------------------------------------------------- keygen command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecl")
    sub = p.add_subparsers(dest="command", required=True)
    keys_cmd.add_parser(sub)
    return p


def test_keygen_command(tmp_path, capsys):
    out = tmp_path / "ci-key"
    args = _parser().parse_args(["keygen", str(out), "--name", "ci"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    kid = SigningKey.load(out).key_id
    assert kid in printed and "EDGECL_TRUST_STORE" in printed
    assert f"put {out}.pub into the device's trust store directory" in printed
    assert f"--key {out} or EDGECL_SIGNING_KEY={out}" in printed
    assert (tmp_path / "ci-key.pub").read_text().split()[2] == "ci"
    with pytest.raises(SigningError, match="already exists") as e:
        args.func(args)
    assert str(out) in str(e.value)

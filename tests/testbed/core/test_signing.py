"""Signed manifests: keys round-trip, and a device's check refuses each kind of forgery with its own reason."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.manifest import (
    RejectReason,
    UpdateManifest,
    UpdateRejected,
    verify_manifest,
)
from testbed.core.signing import SigningKey, SigningKeyError, TrustedKey
from testbed.core.wire import encode_full_model, model_fingerprint

WEIGHTS = {"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "layer.bias": np.ones(3, np.float32)}
FINGERPRINT = model_fingerprint(WEIGHTS)
KEY = SigningKey.generate()
NOW = 1_800_000_000.0


def manifest(**changes) -> UpdateManifest:
    payload = encode_full_model(WEIGHTS, 2)
    unsigned = UpdateManifest.for_payload(payload, run_id="run-a", round_index=1, key="2", base_version=None,
                                          chunk_size=64, published_at=NOW, lifetime_s=60)
    return dataclasses.replace(unsigned, **changes)


def check(candidate: UpdateManifest, now: float = NOW, key: TrustedKey = KEY.trusted_key) -> None:
    verify_manifest(candidate, trusted_key=key, run_id="run-a", model_fingerprint=FINGERPRINT, now=now)


def test_a_signed_manifest_passes_and_survives_json():
    signed = manifest().signed(KEY)
    check(signed)
    check(UpdateManifest.from_json(signed.to_json()))


def test_for_payload_binds_the_header():
    built = manifest()
    assert built.target_version == 2 and built.model_fingerprint == FINGERPRINT.hex()
    assert built.chunk_count == len(built.chunk_sha256) == -(-built.total_bytes // 64)


@pytest.mark.parametrize(("candidate", "now", "reason"), [
    (lambda: manifest(), NOW, RejectReason.UNSIGNED),
    (lambda: manifest().signed(SigningKey.generate()), NOW, RejectReason.BAD_SIGNATURE),
    (lambda: dataclasses.replace(manifest().signed(KEY), target_version=900), NOW, RejectReason.BAD_SIGNATURE),
    (lambda: dataclasses.replace(manifest().signed(KEY), signature="%%%"), NOW, RejectReason.BAD_SIGNATURE),
    (lambda: dataclasses.replace(manifest().signed(KEY), signature="QUJD"), NOW, RejectReason.BAD_SIGNATURE),
    (lambda: manifest(run_id="run-b").signed(KEY), NOW, RejectReason.WRONG_RUN),
    (lambda: manifest(model_fingerprint="00" * 16).signed(KEY), NOW, RejectReason.WRONG_MODEL),
    (lambda: manifest().signed(KEY), NOW + 61, RejectReason.EXPIRED),
])
def test_each_forgery_is_refused_with_its_reason(candidate, now, reason):
    with pytest.raises(UpdateRejected) as refused:
        check(candidate(), now)
    assert refused.value.reason is reason


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([field.name for field in dataclasses.fields(UpdateManifest) if field.name != "signature"]),
       st.data())
def test_changing_any_signed_field_breaks_the_signature(name, data):
    signed = manifest().signed(KEY)
    value = getattr(signed, name)
    if isinstance(value, tuple):
        changed = tuple(reversed(value)) + ("00" * 16,)
    elif isinstance(value, str):
        changed = value + "0"
    elif value is None:
        changed = data.draw(st.integers(0, 10))
    else:
        changed = value + data.draw(st.integers(1, 10))
    assert not dataclasses.replace(signed, **{name: changed}).has_valid_signature(KEY.trusted_key)


def test_key_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "fleet.key"
    KEY.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert SigningKey.load(path).trusted_key == KEY.trusted_key
    with pytest.raises(SigningKeyError, match="not overwriting"):
        KEY.save(path)
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(SigningKeyError, match="testbed keygen"):
        SigningKey.load(tmp_path / "junk.key")
    with pytest.raises(SigningKeyError, match="cannot read"):
        SigningKey.load(tmp_path / "missing.key")


def test_public_key_text_round_trip_and_refusals(tmp_path):
    text = KEY.trusted_key.text
    assert TrustedKey.from_text(text) == KEY.trusted_key
    (tmp_path / "fleet.key.pub").write_text(text + "\n")
    assert TrustedKey.from_argument(str(tmp_path / "fleet.key.pub")) == KEY.trusted_key
    for bad in ("ed25519:", "ed25519:!!!", "rsa:AAAA", "ed25519:" + "A" * 40, "x" * 1000):
        with pytest.raises(SigningKeyError):
            TrustedKey.from_text(bad)
    with pytest.raises(SigningKeyError, match="cannot read"):
        TrustedKey.from_argument(str(tmp_path / "nope.pub"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_signatures_never_verify_or_raise(garbage):
    import base64

    forged = dataclasses.replace(manifest(), signature=base64.b64encode(garbage).decode())
    assert not forged.has_valid_signature(KEY.trusted_key)


def test_signing_is_deterministic_per_key():
    assert manifest().signed(KEY).signature == manifest().signed(KEY).signature
    assert len(os.urandom(1)) == 1

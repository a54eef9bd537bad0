"""The update manifest: JSON round trip, and every malformed payload is a ManifestError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.manifest import ManifestError, UpdateManifest, chunk_digest, payload_digest

FIELDS = sorted(UpdateManifest.__dataclass_fields__)


def _good(**changes) -> dict:
    data = {
        "run_id": "r1", "round_index": 2, "key": "3", "target_version": 3, "base_version": None,
        "total_bytes": 2500, "chunk_count": 3, "chunk_size": 1024,
        "payload_sha256": payload_digest(b"x"), "chunk_sha256": [chunk_digest(bytes([i])) for i in range(3)],
        "model_fingerprint": "ab" * 16, "post_apply_sha256": payload_digest(b"y"),
        "published_at_ms": 1700000000500, "expires_at_ms": 1700003600500, "signature": "",
    }
    data.update(changes)
    if "chunk_count" in changes and "chunk_sha256" not in changes and isinstance(data["chunk_count"], int):
        data["chunk_sha256"] = [chunk_digest(b"c")] * min(max(data["chunk_count"], 0), 100)
    return data


def _manifest(**changes) -> UpdateManifest:
    data = _good(**changes)
    data["chunk_sha256"] = tuple(data["chunk_sha256"])
    return UpdateManifest(**data)


def _encode(data) -> bytes:
    return json.dumps(data).encode("utf-8")


def test_good_manifest_parses():
    manifest = UpdateManifest.from_json(_encode(_good()))
    assert manifest == _manifest()


def test_payload_digest_is_hex_sha256():
    assert payload_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@st.composite
def manifests(draw) -> UpdateManifest:
    chunk_size = draw(st.integers(min_value=1, max_value=2**20))
    chunk_count = draw(st.integers(min_value=1, max_value=40))
    total_bytes = draw(st.integers(min_value=0 if chunk_count == 1 else (chunk_count - 1) * chunk_size + 1,
                                   max_value=chunk_count * chunk_size))
    target = draw(st.integers(min_value=1, max_value=0xFFFFFFFE))
    base = draw(st.none() | st.integers(min_value=0, max_value=0xFFFFFFFE))
    published_at_ms = draw(st.integers(0, 10**13 - 10**7))
    return UpdateManifest(
        run_id=draw(st.text(min_size=1, max_size=40).filter(lambda text: not set(text) & set("/+#\x00"))),
        round_index=draw(st.integers(min_value=0, max_value=2**31)),
        key=str(target) if base is None else f"{target}-from-{base}",
        target_version=target,
        base_version=base,
        total_bytes=total_bytes,
        chunk_count=chunk_count,
        chunk_size=chunk_size,
        payload_sha256=draw(st.binary(max_size=64).map(payload_digest)),
        chunk_sha256=tuple(draw(st.lists(st.binary(max_size=8).map(chunk_digest), min_size=chunk_count,
                                         max_size=chunk_count))),
        model_fingerprint=draw(st.binary(min_size=16, max_size=16)).hex(),
        post_apply_sha256=draw(st.binary(max_size=8).map(payload_digest)),
        published_at_ms=published_at_ms,
        expires_at_ms=published_at_ms + draw(st.integers(0, 10**6)),
        signature=draw(st.sampled_from(["", "A" * 88])),
    )


@given(manifests())
def test_json_round_trip(manifest):
    payload = manifest.to_json()
    assert isinstance(payload, bytes)
    assert UpdateManifest.from_json(payload) == manifest


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe\x00garbage", b"{", b"[]", b"null", b"3", b'"manifest"', b"[" * 100_000,
     b"1" * 5000],
)
def test_not_a_json_object(payload):
    with pytest.raises(ManifestError):
        UpdateManifest.from_json(payload)


def test_missing_field():
    data = _good()
    del data["key"]
    with pytest.raises(ManifestError, match="fields"):
        UpdateManifest.from_json(_encode(data))


def test_extra_field():
    with pytest.raises(ManifestError, match="fields"):
        UpdateManifest.from_json(_encode(_good(surprise=1)))


@pytest.mark.parametrize("name", ["round_index", "target_version", "total_bytes", "chunk_count", "chunk_size"])
@pytest.mark.parametrize("value", [-1, True, False, 1.5, 2.0, "3", None, [1], {"n": 1}, 10**4000])
def test_bad_integer_fields(name, value):
    with pytest.raises(ManifestError):
        UpdateManifest.from_json(_encode(_good(**{name: value})))


@pytest.mark.parametrize("value", [-1, True, 1.5, "2", [2]])
def test_bad_base_version(value):
    with pytest.raises(ManifestError, match="base_version"):
        UpdateManifest.from_json(_encode(_good(base_version=value)))


def test_chunk_count_zero():
    with pytest.raises(ManifestError):
        UpdateManifest.from_json(_encode(_good(total_bytes=0, chunk_count=0)))


def test_chunk_size_zero():
    with pytest.raises(ManifestError):
        UpdateManifest.from_json(_encode(_good(chunk_size=0)))


@pytest.mark.parametrize(("total_bytes", "chunk_size", "chunk_count"), [(2500, 1024, 2), (2500, 1024, 4),
                                                                        (0, 1024, 2), (1, 1, 10**9)])
def test_chunk_count_must_fit_total_and_chunk_size(total_bytes, chunk_size, chunk_count):
    with pytest.raises(ManifestError, match="chunk_count"):
        UpdateManifest.from_json(
            _encode(_good(total_bytes=total_bytes, chunk_size=chunk_size, chunk_count=chunk_count))
        )


@pytest.mark.parametrize(("total_bytes", "chunk_size", "chunk_count"), [(0, 1024, 1), (1024, 1024, 1), (1025, 1024, 2)])
def test_chunk_count_edges_accepted(total_bytes, chunk_size, chunk_count):
    manifest = UpdateManifest.from_json(
        _encode(_good(total_bytes=total_bytes, chunk_size=chunk_size, chunk_count=chunk_count))
    )
    assert manifest.chunk_count == chunk_count


@pytest.mark.parametrize("name", ["run_id", "key", "payload_sha256", "model_fingerprint", "post_apply_sha256",
                                  "signature"])
@pytest.mark.parametrize("value", [1, None, True, ["a"], {"a": 1}])
def test_bad_string_fields(name, value):
    with pytest.raises(ManifestError, match=name):
        UpdateManifest.from_json(_encode(_good(**{name: value})))


@pytest.mark.parametrize("payload", [
    b'{"published_at_ms": NaN}', b'{"published_at_ms": Infinity}',
])
def test_non_finite_published_at(payload):
    data = _good()
    del data["published_at_ms"]
    text = json.dumps(data)[:-1] + ", " + payload.decode()[1:]
    with pytest.raises(ManifestError, match="published_at_ms"):
        UpdateManifest.from_json(text.encode())


def test_huge_integers_are_not_an_overflow():
    for name in ("published_at_ms", "total_bytes", "round_index"):
        with pytest.raises(ManifestError, match=name):
            UpdateManifest.from_json(_encode(_good(**{name: 10**400})))


@pytest.mark.parametrize("name", ["published_at_ms", "expires_at_ms"])
@pytest.mark.parametrize("value", ["now", None, True, [1.0], 1.5, -1, 10**13])
def test_bad_times(name, value):
    with pytest.raises(ManifestError, match=name):
        UpdateManifest.from_json(_encode(_good(**{name: value})))


def test_a_manifest_is_the_same_size_whenever_it_is_published():
    sizes = {len(UpdateManifest(**{**_good(), "chunk_sha256": tuple(_good()["chunk_sha256"]),
                                   "published_at_ms": at, "expires_at_ms": at + 3_600_000}).to_json())
             for at in (1_764_000_000_000, 1_764_000_000_001, 1_799_999_999_990)}
    assert len(sizes) == 1


def _parse_or_manifest_error(payload: bytes) -> None:
    try:
        manifest = UpdateManifest.from_json(payload)
    except ManifestError:
        return
    assert isinstance(manifest, UpdateManifest)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise_anything_else(payload):
    _parse_or_manifest_error(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=12))
def test_arbitrary_json_objects_never_raise_anything_else(data):
    _parse_or_manifest_error(json.dumps(data).encode())


@given(st.fixed_dictionaries({name: json_values for name in FIELDS}))
def test_arbitrary_values_for_the_right_fields_never_raise_anything_else(data):
    _parse_or_manifest_error(json.dumps(data).encode())


@given(manifests(), st.sampled_from(FIELDS), json_values)
def test_one_field_replaced_by_anything(manifest, name, value):
    data = json.loads(manifest.to_json())
    data[name] = value
    _parse_or_manifest_error(json.dumps(data).encode())


@pytest.mark.parametrize(("name", "value"), [
    ("key", "3/4"), ("key", "x"), ("key", "1" * 11), ("key", "3-from-"), ("run_id", "a/b"), ("run_id", "a+"),
    ("run_id", ""), ("run_id", "r" * 257), ("payload_sha256", "AB" * 32), ("payload_sha256", "ab"),
    ("model_fingerprint", "zz" * 16), ("chunk_sha256", ["00" * 16] * 2), ("chunk_sha256", ["0" * 31] * 3),
    ("chunk_sha256", "00"), ("signature", "s" * 129), ("target_version", 0), ("target_version", 2**32 - 1),
    ("chunk_count", 2**17 + 1),
])
def test_bounded_fields(name, value):
    with pytest.raises(ManifestError, match=name if name != "chunk_count" else "chunk"):
        UpdateManifest.from_json(_encode(_good(**{name: value})))


def test_oversized_manifest_is_refused_before_parsing():
    from testbed.core.manifest import MAX_MANIFEST_BYTES

    with pytest.raises(ManifestError, match="exceeds"):
        UpdateManifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))

"""UpdateAssembler: chunks in any order become the payload once; bad chunks are WireErrors; memory is bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.assembly import MAX_PENDING_KEYS, UpdateAssembler
from testbed.core.manifest import UpdateManifest, payload_digest
from testbed.core.wire import WireError, split_chunks


def manifest_for(payload: bytes, chunk_size: int, key: str = "3") -> UpdateManifest:
    return UpdateManifest(
        run_id="r1", round_index=1, key=key, target_version=3, base_version=None,
        total_bytes=len(payload), chunk_count=len(split_chunks(payload, chunk_size)), chunk_size=chunk_size,
        payload_sha256=payload_digest(payload), published_at=0.0,
    )


PAYLOAD = bytes(range(256)) * 10  # 2560 bytes: 3 chunks of 1024


@settings(max_examples=200)
@given(st.data(), st.binary(max_size=3000), st.integers(min_value=1, max_value=700))
def test_chunks_in_any_order_give_the_payload_once(data, payload, chunk_size):
    chunks = split_chunks(payload, chunk_size)
    manifest = manifest_for(payload, chunk_size)
    order = data.draw(st.permutations(range(len(chunks))))
    manifest_at = data.draw(st.integers(min_value=0, max_value=len(chunks)))
    assembler = UpdateAssembler()
    results = []
    for position, index in enumerate(order):
        if position == manifest_at:
            results.append(assembler.expect(manifest))
        results.append(assembler.add_chunk(manifest.key, index, chunks[index]))
    if manifest_at == len(chunks):
        results.append(assembler.expect(manifest))
    completed = [result for result in results if result is not None]
    assert completed == [payload]
    assert results[-1] == payload  # nothing is returned before the last piece arrives
    assert assembler.received_chunk_bytes == len(payload)


def test_manifest_after_all_chunks():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    for index, chunk in enumerate(chunks):
        assert assembler.add_chunk("3", index, chunk) is None
    assert assembler.expect(manifest_for(PAYLOAD, 1024)) == PAYLOAD


def test_empty_payload_is_one_empty_chunk():
    assembler = UpdateAssembler()
    assert assembler.expect(manifest_for(b"", 1024)) is None
    assert assembler.add_chunk("3", 0, b"") == b""


def test_duplicate_chunks_are_harmless():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assert assembler.add_chunk("3", 0, chunks[0]) is None
    assert assembler.add_chunk("3", 0, chunks[0]) is None
    assert assembler.add_chunk("3", 1, chunks[1]) is None
    assert assembler.add_chunk("3", 1, chunks[1]) is None
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD
    # a late duplicate of an update already delivered is not delivered again
    assert assembler.add_chunk("3", 2, chunks[2]) is None


def test_chunk_beyond_chunk_count_raises_and_returns_nothing():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 1, chunks[1])
    with pytest.raises(WireError, match="chunk 3"):
        assembler.add_chunk("3", 3, b"junk")
    assert assembler.dropped_chunks == 1
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


def test_negative_chunk_index_raises():
    assembler = UpdateAssembler()
    with pytest.raises(WireError):
        assembler.add_chunk("3", -1, b"junk")


def test_stray_chunk_before_the_manifest_is_dropped_not_fatal():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 7, b"stray")  # no manifest yet: cannot tell it is out of range
    assembler.add_chunk("3", 1, chunks[1])
    assert assembler.expect(manifest_for(PAYLOAD, 1024)) is None  # chunk 2 still missing
    assert assembler.dropped_chunks == 1
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


def test_corrupted_chunk_is_a_digest_error_and_the_key_is_dropped():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    manifest = manifest_for(PAYLOAD, 1024)
    assembler.expect(manifest)
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 1, bytes([chunks[1][0] ^ 1]) + chunks[1][1:])
    with pytest.raises(WireError, match="SHA-256"):
        assembler.add_chunk("3", 2, chunks[2])
    # the state is gone: good chunks alone do not complete without the manifest again
    for index, chunk in enumerate(chunks):
        assert assembler.add_chunk("3", index, chunk) is None
    assert assembler.expect(manifest) == PAYLOAD


def test_chunk_of_the_wrong_length_is_an_error_and_the_key_is_dropped():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    manifest = manifest_for(PAYLOAD, 1024)
    assembler.expect(manifest)
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 1, chunks[1] + b"extra")
    with pytest.raises(WireError):
        assembler.add_chunk("3", 2, chunks[2])
    assert assembler.add_chunk("3", 2, chunks[2]) is None  # no longer stuck on the bad set
    assert assembler.expect(manifest) is None
    assembler.add_chunk("3", 0, chunks[0])
    assert assembler.add_chunk("3", 1, chunks[1]) == PAYLOAD


def test_oldest_pending_key_is_dropped():
    assembler = UpdateAssembler()
    payloads = {f"k{n}": bytes([n]) * 2048 for n in range(MAX_PENDING_KEYS + 1)}
    for key, payload in payloads.items():
        assembler.add_chunk(key, 0, split_chunks(payload, 1024)[0])
    assert assembler.dropped_chunks == 1  # k0, the oldest
    for key, payload in list(payloads.items())[1:]:
        assert assembler.expect(manifest_for(payload, 1024, key=key)) is None
        assert assembler.add_chunk(key, 1, split_chunks(payload, 1024)[1]) == payload
    # k0's first chunk is gone: its manifest and second chunk do not complete it
    assert assembler.expect(manifest_for(payloads["k0"], 1024, key="k0")) is None
    assert assembler.add_chunk("k0", 1, split_chunks(payloads["k0"], 1024)[1]) is None


def test_the_newest_key_is_never_the_one_dropped():
    assembler = UpdateAssembler()
    for n in range(MAX_PENDING_KEYS):  # keys known only by their manifest
        assembler.expect(manifest_for(bytes([n]) * 2048, 1024, key=f"m{n}"))
    payload = b"new" * 100
    manifest = manifest_for(payload, 1024, key="new")
    assert assembler.add_chunk("new", 0, payload) is None
    assert assembler.expect(manifest) == payload


def test_pending_keys_stay_bounded():
    assembler = UpdateAssembler()
    for n in range(100):
        assembler.add_chunk(f"k{n}", 0, b"x")
        assembler.expect(manifest_for(b"yy", 1, key=f"m{n}"))
    assert len(assembler._chunks) + len(assembler._manifests) <= MAX_PENDING_KEYS


def test_oversize_manifest_raises():
    assembler = UpdateAssembler(max_update_bytes=1000)
    with pytest.raises(WireError, match="exceeds"):
        assembler.expect(manifest_for(b"x" * 1001, 1024))
    assert assembler.expect(manifest_for(b"x" * 1000, 1024)) is None


def test_chunks_without_a_manifest_are_bounded_in_bytes():
    assembler = UpdateAssembler(max_update_bytes=1000)
    for index in range(9):
        assembler.add_chunk("3", index, b"x" * 100)
    assembler.add_chunk("3", 0, b"x" * 100)  # a duplicate replaces, it does not add
    with pytest.raises(WireError, match="limit"):
        for index in range(9, 20):
            assembler.add_chunk("3", index, b"x" * 100)
    assert "3" not in assembler._chunks


def test_forget():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    manifest = manifest_for(PAYLOAD, 1024)
    assembler.expect(manifest)
    for index, chunk in enumerate(chunks[:-1]):
        assembler.add_chunk("3", index, chunk)
    assembler.forget("3")
    assert assembler.add_chunk("3", 2, chunks[2]) is None

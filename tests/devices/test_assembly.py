"""UpdateAssembler: chunks in any order become the payload once; chunks not matching the signed digests are
refused without losing the genuine ones; memory is bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.assembly import MAX_CANDIDATES, MAX_PENDING_KEYS, UpdateAssembler
from testbed.core.manifest import RejectReason, UpdateManifest, UpdateRejected, chunk_digest, payload_digest
from testbed.core.wire import split_chunks


def manifest_for(payload: bytes, chunk_size: int, key: str = "3", payload_sha256: str | None = None) -> UpdateManifest:
    chunks = split_chunks(payload, chunk_size)
    return UpdateManifest(
        run_id="r1", round_index=1, key=key, target_version=3, base_version=None,
        total_bytes=len(payload), chunk_count=len(chunks), chunk_size=chunk_size,
        payload_sha256=payload_sha256 or payload_digest(payload),
        chunk_sha256=tuple(chunk_digest(chunk) for chunk in chunks), model_fingerprint="00" * 16,
        post_apply_sha256="00" * 32, published_at_ms=0, expires_at_ms=60_000,
    )


def refused(reason: RejectReason):
    return pytest.raises(UpdateRejected, match=reason.value)


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


def test_duplicate_chunks_and_manifests_are_harmless():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assert assembler.add_chunk("3", 0, chunks[0]) is None
    assert assembler.add_chunk("3", 0, chunks[0]) is None
    assert assembler.expect(manifest_for(PAYLOAD, 1024)) is None  # re-announced: chunk 0 is still held
    assert assembler.add_chunk("3", 1, chunks[1]) is None
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD
    # a late duplicate of an update already delivered is not delivered again, nor held as a new update in flight
    assert assembler.add_chunk("3", 2, chunks[2]) is None
    assert (assembler.pending_updates, assembler.late_chunks) == (0, 1)


def test_chunk_beyond_chunk_count_is_refused_and_the_update_still_completes():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 1, chunks[1])
    with refused(RejectReason.BAD_CHUNK):
        assembler.add_chunk("3", 3, b"junk")
    assert assembler.dropped_chunks == 1
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


@pytest.mark.parametrize("forge", [lambda chunk: bytes([chunk[0] ^ 1]) + chunk[1:], lambda chunk: chunk + b"x",
                                   lambda chunk: chunk[:-1], lambda chunk: b""])
def test_an_injected_chunk_is_refused_and_the_genuine_one_still_completes(forge):
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assembler.add_chunk("3", 0, chunks[0])
    with refused(RejectReason.BAD_CHUNK):
        assembler.add_chunk("3", 1, forge(chunks[1]))
    assert assembler.add_chunk("3", 1, chunks[1]) is None
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


def test_forged_chunks_before_the_manifest_do_not_displace_the_genuine_ones():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.add_chunk("3", 0, chunks[0])
    for n in range(MAX_CANDIDATES - 1):
        assembler.add_chunk("3", 0, b"forged %d" % n)  # after the genuine one
        assembler.add_chunk("3", 1, b"forged %d" % n)  # before it
    assembler.add_chunk("3", 1, chunks[1])
    with refused(RejectReason.BAD_CHUNK):
        assembler.add_chunk("3", 1, b"one version too many")
    assembler.add_chunk("3", 7, b"stray")  # no manifest yet: cannot tell it is out of range
    assert assembler.expect(manifest_for(PAYLOAD, 1024)) is None  # chunk 2 still missing
    assert assembler.dropped_chunks == 1 + 2 * (MAX_CANDIDATES - 1) + 1
    assert assembler.mismatched_chunks == 2 * (MAX_CANDIDATES - 1) + 1  # the one refused on arrival is not one
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


def test_payload_not_matching_the_manifest_digest_is_a_bad_update():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024, payload_sha256=payload_digest(b"other")))
    assembler.add_chunk("3", 0, chunks[0])
    assembler.add_chunk("3", 1, chunks[1])
    with refused(RejectReason.BAD_UPDATE):
        assembler.add_chunk("3", 2, chunks[2])
    assert assembler.pending_updates == 0


def test_oldest_announced_key_is_dropped():
    assembler = UpdateAssembler()
    payloads = {f"{n}": bytes([n]) * 2048 for n in range(MAX_PENDING_KEYS + 1)}
    for key, payload in payloads.items():
        assembler.expect(manifest_for(payload, 1024, key=key))
        assembler.add_chunk(key, 0, split_chunks(payload, 1024)[0])
    assert assembler.dropped_chunks == 1  # key 0's chunk, the oldest
    assert assembler.mismatched_chunks == 0  # given up for newer announcements, not found forged
    for key, payload in list(payloads.items())[1:]:
        assert assembler.add_chunk(key, 1, split_chunks(payload, 1024)[1]) == payload
    assert not assembler.expects("0")


def test_unannounced_chunks_never_push_out_an_announced_update():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    assembler.add_chunk("3", 0, chunks[0])
    for n in range(10 * MAX_PENDING_KEYS):
        assembler.add_chunk(f"garbage{n}", 0, b"x" * 1000)
    assert assembler.expects("3")
    assert assembler.pending_updates <= 2 * MAX_PENDING_KEYS
    assembler.add_chunk("3", 1, chunks[1])
    assert assembler.add_chunk("3", 2, chunks[2]) == PAYLOAD


def test_oversize_manifest_is_refused():
    assembler = UpdateAssembler(max_update_bytes=1000)
    with refused(RejectReason.MALFORMED):
        assembler.expect(manifest_for(b"x" * 1001, 1024))
    assert assembler.expect(manifest_for(b"x" * 1000, 1024)) is None


def test_chunks_without_a_manifest_are_bounded_in_bytes():
    assembler = UpdateAssembler(max_unannounced_bytes=1000)
    for index in range(9):
        assembler.add_chunk("a", index, b"x" * 100)
    assembler.add_chunk("a", 0, b"x" * 100)  # the same chunk again adds nothing
    for index in range(9):
        assembler.add_chunk("b", index, b"y" * 100)  # pushes out the oldest unannounced key, a
    assert not assembler._candidates.get("a")
    with refused(RejectReason.BAD_CHUNK):
        assembler.add_chunk("c", 0, b"z" * 1001)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["3", "4", "x"]), st.integers(0, 5), st.binary(max_size=300)), max_size=60))
def test_garbage_chunks_in_any_number_leave_the_genuine_update_whole(garbage):
    assembler = UpdateAssembler(max_unannounced_bytes=4000)
    chunks = split_chunks(PAYLOAD, 1024)
    assembler.expect(manifest_for(PAYLOAD, 1024))
    results = []
    for position, (key, index, data) in enumerate(garbage):
        try:
            results.append(assembler.add_chunk(key, index, data))
        except UpdateRejected as error:
            assert error.reason is RejectReason.BAD_CHUNK
        if position < len(chunks):
            results.append(assembler.add_chunk("3", position, chunks[position]))
    for index in range(min(len(garbage), len(chunks)), len(chunks)):
        results.append(assembler.add_chunk("3", index, chunks[index]))
    assert [result for result in results if result is not None] == [PAYLOAD]


def test_forget():
    assembler = UpdateAssembler()
    chunks = split_chunks(PAYLOAD, 1024)
    manifest = manifest_for(PAYLOAD, 1024)
    assembler.expect(manifest)
    for index, chunk in enumerate(chunks[:-1]):
        assembler.add_chunk("3", index, chunk)
    assembler.forget("3")
    assert assembler.add_chunk("3", 2, chunks[2]) is None

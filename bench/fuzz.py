"""Benchmark: fuzz every parser a hostile peer reaches with 10^5 inputs; the target is 0 undocumented exceptions.

Inputs are random bytes and mutations of valid encodings: bit flips, truncation, splicing, integer and length field
edits, JSON field replacement. To reach the code behind a check, a mutated update body gets its payload hash
recomputed, and the receiver gets manifests re-signed with the run's key (digests recomputed with `for_payload`).
Every input ends as a documented rejection (the parser's own error, or its documented "no": None, a counted drop),
an acceptance (checked against the parser's contract), "ignored" (no error, nothing taken), or anything else, which
fails the run. Deterministic under --seed; each target runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import resource
import signal
import struct
import sys
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.assembly import MAX_UPDATE_BYTES
from devices.board_agent import board_config_from_payload, board_config_payload
from devices.frame_order import CONTROL_TYPES, LinkProtocol, LinkSettings
from devices.serial_framing import (
    ACK_HEADER, DEFAULT_MAX_FRAME_BYTES, HEADER, SESSION, UPDATE_CHUNK_INDEX, UPDATE_CHUNK_KEY, Ack, DecodeError,
    Frame, FrameDecoder, Hello, MessageType, SerialFrameError, UpdateChunk, cobs_decode, cobs_encode, encode_frame,
    json_payload, log_payload, max_payload_bytes, parse_frame_body, parse_json_payload, parse_log_payload,
    parse_session_payload, session_payload,
)
from devices.serial_link import SerialLinkError
from devices.update_receiver import UpdateReceiver, UpdateTrust
from testbed.core import wire
from testbed.core.codecs import WireError, index_codecs, value_codecs
from testbed.core.initial_weights import initial_weights
from testbed.core.manifest import (
    MAX_CHUNKS, MAX_MANIFEST_BYTES, ManifestError, UpdateManifest, UpdateRejected, chunk_digest, payload_digest,
    verify_manifest,
)
from testbed.core.messages import (
    MAX_CONFIG_MESSAGE_BYTES, MAX_DEVICE_MESSAGE_BYTES, BoardConfig, DeviceHello, DeviceNack, DeviceReport,
    DeviceStatus, MessageError, RunConfig, RunFinished, decode_config_topic, decode_device_message,
)
from testbed.core.signing import SigningKey
from testbed.core.topics import DEVICE_MESSAGE_KINDS, MAX_CHUNK_INDEX_DIGITS, MAX_UPDATE_KEY_CHARS, Topics, update_key

DEFAULT_INPUTS = 100_000
QUICK_INPUTS = 3_000
MAX_INPUT_BYTES = 64 * 1024  # mutations never grow an input past this (the size-limit probes excepted)
FAILURES_SHOWN = 3
HEX_SHOWN = 48
RUN_ID = "fuzz-run"
INIT_SEED = 7
NOW = 1_700_000_000.0
MODELS = {
    "mlp": (("fc1.weight", (12, 10)), ("fc1.bias", (12,)), ("fc2.weight", (4, 12)), ("fc2.bias", (4,))),
    "conv": (("conv.weight", (4, 1, 3, 3)), ("conv.bias", (4,)), ("norm.running_var", (4,)), ("head.weight", (3, 16))),
}
INTERESTING_INTS = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                    0xFFFFFFFE, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1)
SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, -0.0, 1e-45, 3e38, 0.0)
BYTE_MUTATIONS = ("bitflip", "byte", "truncate", "extend", "splice", "int", "field", "delete", "duplicate", "insert")
JSON_VALUES = (None, True, False, 0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -2**63 - 1, 0.5, -0.0, 1e308, "",
               "x" * 300, "0" * 64, "ℵ", "\x00", [], {}, [1, "a"], {"a": None}, ["0" * 32] * 3)
RAW_TOKENS = ("NaN", "Infinity", "-Infinity", "1e999", "-0", "1" + "0" * 400, "1" + "0" * 5000, "[" * 3000 + "]" * 3000,
              '{"a":' * 300 + "1" + "}" * 300, '"\\ud800"', "01", '"\\u0000"')
RAW = re.compile(r'"\\u0001raw(\d+)\\u0001"')  # a placeholder json.dumps writes, replaced by a raw token
TOPIC_PIECES = ("/", "+", "#", "0", "7", "-", "a", "\x00", "²", "٣", "𝟘", " ", "é", "update", "device", "-from-",
                "\ud800")
ACCEPTED, REJECTED, IGNORED, OTHER = "accepted", "rejected", "ignored", "other"
Case = tuple[str, bytes, Callable[[], str]]  # (how it was made, the input as shown on failure, run it -> outcome)


class ContractViolation(Exception):
    """A parser accepted an input and returned something its documentation rules out."""


class InputTimeout(BaseException):
    """One input took longer than --timeout (a BaseException, so no `except Exception` in a parser swallows it)."""


def expect(condition: object, what: str) -> None:
    if not condition:
        raise ContractViolation(what)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def random_bytes(rng: np.random.Generator, limit: int = 512) -> bytes:
    return rng.bytes(int(rng.integers(0, limit + 1)))


def struct_fields(layout: struct.Struct, at: int = 0) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of a little-endian struct layout, shifted by `at`."""
    fields, offset = [], at
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format):
        if code == "s":
            offset += int(count or 1)
            continue
        for _ in range(int(count or 1)):
            fields.append((offset, struct.calcsize("<" + code)))
            offset += fields[-1][1]
    return fields


def _put_int(data: bytearray, offset: int, width: int, rng: np.random.Generator) -> None:
    current = int.from_bytes(data[offset:offset + width], "little")
    value = _pick(rng, INTERESTING_INTS) if rng.random() < 0.7 else current + int(rng.integers(-4, 5))
    data[offset:offset + width] = (value % (1 << 8 * width)).to_bytes(width, "little")


def mutate(data: bytes, rng: np.random.Generator, others: Sequence[bytes], fields: Sequence[tuple[int, int]] = (),
           ops: Sequence[str] = BYTE_MUTATIONS) -> tuple[str, bytes]:
    """One to three stacked byte mutations of `data`, named; `fields` are known integer (length) fields."""
    out, names = bytearray(data), []
    for _ in range(int(rng.integers(1, 4))):
        op, size = _pick(rng, ops), len(out)
        names.append(op)
        start = int(rng.integers(size + 1))
        if op == "bitflip" and size:
            for bit in rng.integers(0, size * 8, int(rng.integers(1, 9))):
                out[int(bit) // 8] ^= 1 << (int(bit) % 8)
        elif op == "byte" and size:
            for position in rng.integers(0, size, int(rng.integers(1, 5))):
                out[int(position)] = _pick(rng, (0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))))
        elif op == "truncate":
            del out[start:]
        elif op == "extend":
            out += random_bytes(rng, 64)
        elif op == "splice":
            other = _pick(rng, others)
            out = out[:start] + other[int(rng.integers(len(other) + 1)):]
        elif op == "field" and fields:
            offset, width = _pick(rng, fields)
            if offset + width <= size:
                _put_int(out, offset, width, rng)
        elif op in ("int", "field") and size:
            width = _pick(rng, (1, 2, 4, 8))
            if size >= width:
                _put_int(out, int(rng.integers(size - width + 1)), width, rng)
        elif op == "delete":
            del out[start:start + int(rng.integers(1, 33))]
        elif op == "duplicate":
            out[start:start] = out[start:start + int(rng.integers(1, 65))]
        elif op == "insert":
            out[start:start] = random_bytes(rng, 16)
    return "+".join(names), bytes(out[:MAX_INPUT_BYTES])


def _json_paths(value: object, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _json_paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            paths += _json_paths(item, path + (index,))
    return paths


def _near(value: object, rng: np.random.Generator) -> object:
    """A plausible neighbour of a JSON value (one off, sign flipped, a character more or less)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return _pick(rng, (value + 1, value - 1, -value, value * 2**32, 0))
    if isinstance(value, float):
        return _pick(rng, (value + 1.0, value - 1e6, -value, value * 1e300, 0.0))
    if isinstance(value, str):
        return _pick(rng, (value[:-1], value + "0", value.upper(), value[::-1], value * 2))
    if isinstance(value, list):
        return _pick(rng, (value[:-1], value + value[:1], [value]))
    return copy.deepcopy(_pick(rng, JSON_VALUES))


def mutate_json(document: object, rng: np.random.Generator) -> tuple[str, object]:
    """A copy of `document` with one to three edits: a value replaced (neighbour, odd value, raw token), a key
    dropped or added."""
    document, names = copy.deepcopy(document), []
    for _ in range(int(rng.integers(1, 4))):
        path = _pick(rng, _json_paths(document))
        op = _pick(rng, ("near", "value", "raw", "delete", "add"))
        parent = document
        for part in path[:-1]:
            parent = parent[part]  # type: ignore[index]
        current = parent[path[-1]] if path else document  # type: ignore[index]
        if op == "delete" and path:
            del parent[path[-1]]  # type: ignore[attr-defined]
            names.append(f"delete:{path[-1]}")
            continue
        if op == "add" and isinstance(current, dict):
            current[_pick(rng, ("extra", "", "schema_version", "signature"))] = copy.deepcopy(_pick(rng, JSON_VALUES))
            names.append("add")
            continue
        if op == "near":
            replacement = _near(current, rng)
        elif op == "value":
            replacement = copy.deepcopy(_pick(rng, JSON_VALUES))
        else:  # "raw", or a delete or add with nothing to work on
            op, replacement = "raw", f"\x01raw{int(rng.integers(len(RAW_TOKENS)))}\x01"
        names.append(f"{op}:{path[-1] if path else '$'}")
        if path:
            parent[path[-1]] = replacement  # type: ignore[index]
        else:
            document = replacement
    return "+".join(names), document


def dump_json(document: object) -> bytes:
    return RAW.sub(lambda match: RAW_TOKENS[int(match[1])], json.dumps(document)).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Encoding:
    """A genuine encoded update, the weights it applies to, and the base version its manifest announces."""

    model: str
    payload: bytes
    base: dict[str, np.ndarray]
    base_version: int | None  # None: a snapshot

    @property
    def holder_version(self) -> int:
        return self.base_version or 0


def _perturbed(weights: dict[str, np.ndarray], rng: np.random.Generator, fraction: float) -> dict[str, np.ndarray]:
    changed = {}
    for name, array in weights.items():
        flat = array.copy().ravel()
        mask = rng.random(flat.size) < fraction
        flat[mask] += rng.normal(0, 0.1, int(mask.sum())).astype(np.float32)
        if rng.random() < 0.3:
            flat[int(rng.integers(flat.size))] = _pick(rng, SPECIAL_FLOATS)
        changed[name] = flat.reshape(array.shape)
    return changed


SCENARIO = {"name": "fuzz", "seed": 1, "rounds": 3, "model": {"hidden": [16]},
            "devices": [{"name": "dev-a", "profile": "rpi4"}, {"name": "pi-1", "profile": "rpi4", "serial": True}],
            "update": {"ratio": 0.01, "codec": {"index": "auto", "values": "fp32"}}}
REPORT = DeviceReport(
    device="dev-a", profile="rpi4", round=2, version=3, weights_hash="ab" * 32, accuracy=0.9, update_bytes=1200,
    received_bytes=1300, transmitted_bytes=400, total_received_bytes=5000, delivery_seconds=0.5, apply_seconds=0.01,
    evaluate_seconds=0.2, energy_joules=0.3, energy_joules_by_phase={"receive": 0.2, "compute": 0.1},
    phase_seconds={"receive": 0.5, "compute": 0.2}, total_energy_joules=1.5, rejected_updates=1,
    rejected_by_reason={"bad_chunk": 1}, kind="serial", published_at=NOW, report_delay_seconds=0.1,
    serial_frames_lost=0, measured_energy={"meter": "ina219", "samples": 120})


class Corpus:
    """Genuine encodings of two small models, the run's signing key, and a valid example of every message."""

    def __init__(self, seed: int) -> None:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
        self.key = SigningKey(Ed25519PrivateKey.from_private_bytes(rng.bytes(32)))
        self.stranger = SigningKey(Ed25519PrivateKey.from_private_bytes(rng.bytes(32)))
        self.trust = UpdateTrust(RUN_ID, self.key.trusted_key, clock=lambda: NOW)
        self.initial = {model: initial_weights(layout, INIT_SEED) for model, layout in MODELS.items()}
        self.updates: list[Encoding] = []
        self.chains: dict[str, tuple[Encoding, Encoding]] = {}  # a fp32 snapshot v1 and the update v1 -> v2
        for model, w0 in self.initial.items():
            w1 = _perturbed(w0, rng, 0.3)
            pruned = {name: np.where(rng.random(a.shape) < 0.7, 0, a).astype(np.float32) for name, a in w1.items()}
            for values in ("fp32", "fp16", "int8"):
                self.updates.append(Encoding(model, wire.encode_full_model(w1, 1, values), w0, None))
                for index in ("raw", "bitmap", "golomb-rice"):
                    snapshot = wire.encode_sparse_snapshot(pruned, 1, index, values)
                    self.updates.append(Encoding(model, snapshot, w0, None))
                    for fraction in (0.0, 0.02, 0.3):
                        target = _perturbed(w0, rng, fraction)
                        self.updates.append(Encoding(model, wire.encode_update(w0, target, 0, 1, index, values), w0, 0))
            step = Encoding(model, wire.encode_update(w1, _perturbed(w1, rng, 0.1), 1, 2), w1, 1)
            self.updates.append(step)
            self.chains[model] = (next(e for e in self.updates if e.model == model and e.base_version is None), step)
        self.payloads = [encoding.payload for encoding in self.updates]
        self.manifests = [self.manifest(e.payload, e.base_version).to_json() for e in self.updates]
        board = BoardConfig(run=RUN_ID, device="dev-a", device_index=0, init_seed=INIT_SEED,
                            public_key=self.key.trusted_key.text, scenario=SCENARIO)
        run_config = RunConfig(run=RUN_ID, started_at=NOW, init_seed=INIT_SEED, public_key=self.key.trusted_key.text,
                               scenario=SCENARIO, devices={"dev-a": 0, "pi-1": 1})
        self.messages: list[tuple[str, Callable[[bytes], object], bytes]] = [
            ("hello", partial(decode_device_message, "hello"), DeviceHello(
                device="dev-a", profile="rpi4", version=3, kind="serial", port="/dev/ttyUSB0", board="pi-1",
                capabilities=["energy"]).encode()),
            ("status", partial(decode_device_message, "status"), DeviceStatus(online=True).encode()),
            ("report", partial(decode_device_message, "report"), REPORT.encode()),
            ("nack", partial(decode_device_message, "nack"), DeviceNack(device="dev-a", version=2, reason="bad_update",
                                                                        session=1).encode()),
            ("manifest-kind", partial(decode_device_message, "manifest"), DeviceStatus(online=False).encode()),
            ("run-config", RunConfig.decode, run_config.encode()),
            ("board-config", BoardConfig.decode, board.encode()),
            ("config-topic", decode_config_topic, run_config.encode()),
            ("config-topic-end", decode_config_topic, RunFinished().encode()),
        ]
        body = cobs_decode(encode_frame(MessageType.UPDATE_CHUNK, 9, b"\x00chunk\x00", session=5)[1:-1])
        self.serial_payloads: list[tuple[str, Callable[[bytes], object], bytes, list[tuple[int, int]]]] = [
            ("update-chunk", UpdateChunk.from_payload, UpdateChunk("3-from-2", 5, bytes(range(40))).to_payload(),
             struct_fields(UPDATE_CHUNK_KEY) + struct_fields(UPDATE_CHUNK_INDEX, 10)),
            ("ack", Ack.from_payload, Ack(17, 5, "lost").to_payload(), struct_fields(ACK_HEADER)),
            ("sync", parse_session_payload, session_payload(5, 3), struct_fields(SESSION)),
            ("hello", Hello.from_payload, Hello("pi-1", "rpi4", ("energy",), 3, RUN_ID).to_payload(), []),
            ("json", parse_json_payload, json_payload({"device": "dev-a", "ok": True, "version": 2}), []),
            ("log", parse_log_payload, log_payload("board ready"), []),
            ("cobs", cobs_decode, cobs_encode(b"\x01\x00" * 10 + bytes(range(1, 256)) * 2), []),
            ("frame-body", parse_frame_body, body, struct_fields(HEADER)),
            ("board-config", board_config_from_payload, board_config_payload(board), []),
        ]
        self.board_config = json.loads(board.encode())
        # About the most one CONFIG frame's payload inflates to: 4 MB of JSON (1 MiB is the message limit).
        self.zlib_bomb = zlib.compress(b'{"run": "' + b"a" * 4_000_000 + b'"}', 9)
        assert len(self.zlib_bomb) <= max_payload_bytes(DEFAULT_MAX_FRAME_BYTES), len(self.zlib_bomb)

    def manifest(self, payload: bytes, base_version: int | None, chunk_size: int = 200,
                 **changes: Any) -> UpdateManifest:
        """The manifest the run would publish for `payload` (digests from `for_payload`), changed, then signed."""
        target = wire.decode_header(payload).target_version
        unsigned = UpdateManifest.for_payload(payload, run_id=RUN_ID, round_index=target - 1,
                                              key=update_key(target, base_version), base_version=base_version,
                                              chunk_size=chunk_size, published_at=NOW - 10)
        return dataclasses.replace(unsigned, **changes).signed(self.key)

    def resigned_for(self, payload: bytes, encoding: Encoding, chunk_size: int,
                     rng: np.random.Generator) -> UpdateManifest:
        """A signed manifest for a mutated payload: from its own header, or the genuine one with new digests."""
        if rng.random() < 0.5:
            try:
                return self.manifest(payload, encoding.base_version, chunk_size)
            except WireError:
                pass
        chunks = wire.split_chunks(payload, chunk_size)
        return self.manifest(encoding.payload, encoding.base_version, chunk_size, total_bytes=len(payload),
                             chunk_count=len(chunks), payload_sha256=payload_digest(payload),
                             chunk_sha256=tuple(chunk_digest(chunk) for chunk in chunks))

    def forged(self, manifest: UpdateManifest, rng: np.random.Generator) -> tuple[str, UpdateManifest]:
        """A manifest not to apply: a stranger's, unsigned, relabelled, expired, foreign, or signed but not fitting
        its chunks."""
        oversize = MAX_UPDATE_BYTES + 1
        return _pick(rng, (
            ("stranger", manifest.signed(self.stranger)),
            ("unsigned", dataclasses.replace(manifest, signature="")),
            ("relabelled", dataclasses.replace(manifest, target_version=manifest.target_version + 999)),
            ("garbage-signature", dataclasses.replace(manifest, signature="A" * 86 + "==")),
            ("expired", dataclasses.replace(manifest, expires_at_ms=int((NOW - 1) * 1000)).signed(self.key)),
            ("wrong-run", dataclasses.replace(manifest, run_id="other-run").signed(self.key)),
            ("wrong-model", dataclasses.replace(manifest, model_fingerprint="00" * 16).signed(self.key)),
            ("wrong-digest", dataclasses.replace(manifest, payload_sha256=payload_digest(b"other")).signed(self.key)),
            ("wrong-total", dataclasses.replace(manifest, total_bytes=manifest.total_bytes - 1).signed(self.key)),
            ("oversize", dataclasses.replace(manifest, total_bytes=oversize, chunk_size=oversize, chunk_count=1,
                                             chunk_sha256=manifest.chunk_sha256[:1]).signed(self.key)),
        ))


# --- targets: each makes one input and the call that runs it --------------------------------------------------

WIRE_FIELDS = struct_fields(wire.HEADER)
PAYLOAD_HASH_AT = wire.HEADER_BYTES - 64  # the header ends with the payload hash and the post-apply hash


def _with_payload_hash(data: bytes) -> bytes:
    """`data` with its header's payload hash recomputed, so a mutated body gets past the hash to the codecs."""
    if len(data) < wire.HEADER_BYTES:
        return data
    return data[:PAYLOAD_HASH_AT] + hashlib.sha256(data[wire.HEADER_BYTES:]).digest() + data[PAYLOAD_HASH_AT + 32:]


def _with_lengths(data: bytes) -> bytes:
    """`data` with its header's dense section length made to fit the total length, where it can."""
    (index_at, _), (value_at, _), (dense_at, _) = WIRE_FIELDS[-3:]
    if len(data) < wire.HEADER_BYTES:
        return data
    dense = len(data) - wire.HEADER_BYTES - int.from_bytes(data[index_at:index_at + 4], "little") \
        - int.from_bytes(data[value_at:value_at + 4], "little")
    return data[:dense_at] + dense.to_bytes(4, "little") + data[dense_at + 4:] if dense >= 0 else data


def _mutated_update(rng: np.random.Generator, corpus: Corpus, encoding: Encoding) -> tuple[str, bytes]:
    """A mutated update: anywhere, or inside one section with the lengths kept; mostly with the hashes made to fit."""
    payload, header = encoding.payload, wire.decode_header(encoding.payload)
    start = wire.HEADER_BYTES
    sections = []
    for name, size in (("index", header.index_bytes), ("value", header.value_bytes), ("dense", header.dense_bytes)):
        sections += [(name, start, size)] if size else []
        start += size
    if rng.random() < 0.4 and sections:  # reaches the codecs and apply_update
        name, start, size = _pick(rng, sections)
        label, section = mutate(payload[start:start + size], rng, [], ops=("bitflip", "byte", "int"))
        return f"{name}:{label}+hash", _with_payload_hash(payload[:start] + section + payload[start + size:])
    label, data = mutate(payload, rng, corpus.payloads, WIRE_FIELDS)
    if rng.random() < 0.3:
        label, data = label + "+lengths", _with_lengths(data)
    if rng.random() < 0.7:
        return label + "+hash", _with_payload_hash(data)
    return label, data


def wire_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    encoding = _pick(rng, corpus.updates)
    roll = rng.random()
    if roll < 0.1:
        return _join_case(rng, encoding)
    label, data = (("genuine", encoding.payload) if roll < 0.15 else ("random", random_bytes(rng)) if roll < 0.2
                   else _mutated_update(rng, corpus, encoding))

    def run() -> str:
        header = wire.decode_header(data)
        update = wire.decode_update(data)
        positions = update.positions
        expect(update.header == header, "decode_update read another header than decode_header")
        expect(positions.size == header.k and (header.k == 0 or (positions[0] >= 0 and positions[-1] < header.n
                                                                  and np.all(np.diff(positions) > 0))),
               "decoded positions are not k sorted unique positions in [0, n)")
        wire.apply_update(encoding.base, encoding.holder_version, update)
        return ACCEPTED
    return label, data, run


def _join_case(rng: np.random.Generator, encoding: Encoding) -> Case:
    chunks = dict(enumerate(wire.split_chunks(encoding.payload, int(rng.integers(1, 300)))))
    count, total, edits = len(chunks), len(encoding.payload), []
    for _ in range(int(rng.integers(1, 3))):
        edit = _pick(rng, ("drop", "extra", "count", "total", "resize", "none"))
        edits.append(edit)
        if edit == "drop" and chunks:
            del chunks[_pick(rng, sorted(chunks))]
        elif edit == "extra":
            chunks[_pick(rng, (count, -1, 2**40, int(rng.integers(count + 2))))] = b"x"
        elif edit == "count":
            count = _pick(rng, (0, -1, count + 1, count - 1, True, MAX_CHUNKS))  # callers pass a manifest's count
        elif edit == "total":
            total += int(rng.integers(-3, 4))
        elif edit == "resize" and chunks:
            index = _pick(rng, sorted(chunks))
            chunks[index] = chunks[index][:-1] if rng.random() < 0.5 else chunks[index] + b"\x00"

    def run() -> str:
        expect(len(wire.join_chunks(chunks, count, total)) == total, "join_chunks returned another length than total")
        return ACCEPTED
    return "join:" + "+".join(edits), f"indexes {sorted(chunks)[:12]} count={count} total={total}".encode(), run


def codecs_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    """Index and value sections of the lengths the header check lets through (the codecs' precondition)."""
    return _index_case(rng) if rng.random() < 0.65 else _value_case(rng)


def _fit(section: bytes, low: int, high: int, rng: np.random.Generator) -> bytes:
    length = len(section) if low <= len(section) <= high else int(rng.integers(low, min(high, low + 4096) + 1))
    padding = bytes(max(0, length - len(section))) if rng.random() < 0.5 else rng.bytes(max(0, length - len(section)))
    return (section + padding)[:length]


def _index_case(rng: np.random.Generator) -> Case:
    name = _pick(rng, tuple(index_codecs()))
    codec = index_codecs()[name]
    if name == "golomb-rice" and rng.random() < 0.3:
        n = _pick(rng, (2**31, 2**32, 2**32 + 1, 2**40, 2**62))
    elif name == "raw" and rng.random() < 0.2:
        n = _pick(rng, (2**31, 2**32))
    else:
        n = _pick(rng, (1, 2, 7, 8, 9, 63, 64, 65, 255, 256, 1000, 4096, int(rng.integers(1, 5000))))
    k = n if name == "dense" else min(n, _pick(rng, (0, 1, 2, int(rng.integers(0, 300)), n)), 300)
    low, high = codec.section_bounds(n, k)  # type: ignore[misc]  # representable by construction
    section = codec.encode(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64), n)
    label = f"{name} n={n} k={k}"
    if rng.random() < 0.8:
        mutation, section = mutate(section, rng, [section])
        label += " " + mutation
    section = _fit(section, low, high, rng)

    def run() -> str:
        positions = codec.decode(section, n, k)
        expect(positions.dtype == np.int64 and positions.size == k and (
            k == 0 or (positions[0] >= 0 and positions[-1] < n and np.all(np.diff(positions) > 0))),
            f"{name} decoded positions that are not k sorted unique positions in [0, n)")
        return ACCEPTED
    return label, section, run


def _value_case(rng: np.random.Generator) -> Case:
    name = _pick(rng, tuple(value_codecs()))
    codec = value_codecs()[name]
    k, tensors = int(rng.integers(0, 300)), int(rng.integers(1, 5))
    entries = tensors if codec.tensor_bytes else 0
    base = rng.normal(0, 1, k).astype(np.float32)
    target = (base + rng.normal(0, 0.1, k)).astype(np.float32)
    if k and rng.random() < 0.3:
        target[int(rng.integers(k))] = _pick(rng, SPECIAL_FLOATS)
    tensor_of = np.sort(rng.integers(0, tensors, k))
    section = codec.pack(codec.quantise(target, base, tensor_of, tensors))
    label = f"{name} k={k} tensors={entries}"
    if rng.random() < 0.85:
        mutation, section = mutate(section, rng, [section])
        label += " " + mutation
    size = codec.value_bytes * k + codec.tensor_bytes * entries
    section = _fit(section, size, size, rng)

    def run() -> str:
        stored = codec.unpack(section, k, entries)
        held = codec.held(base, stored, tensor_of)
        expect(stored.values.size == k and stored.scales.size == entries and held.dtype == np.float32
               and held.size == k, f"{name} unpacked another number of values or scales than asked")
        return ACCEPTED
    return label, section, run


def _manifest_variant(rng: np.random.Generator, corpus: Corpus, manifest: UpdateManifest) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.05:
        return "genuine", manifest.to_json()
    if roll < 0.1:
        return "random", random_bytes(rng)
    if roll < 0.11:
        return "size-limit", manifest.to_json()[:-1] + b" " * (MAX_MANIFEST_BYTES - len(manifest.to_json()) + 1) + b"}"
    if roll < 0.3:
        return mutate(manifest.to_json(), rng, corpus.manifests)
    if roll < 0.4:
        label, forged = corpus.forged(manifest, rng)
        return label, forged.to_json()
    label, document = mutate_json(json.loads(manifest.to_json()), rng)
    if rng.random() < 0.6 and isinstance(document, dict) and set(document) == set(UpdateManifest.__dataclass_fields__):
        try:
            fields = dict(document, chunk_sha256=tuple(document["chunk_sha256"]))
            document["signature"] = UpdateManifest(**fields).signed(corpus.key).signature
            label += "+signed"
        except (TypeError, ValueError):
            pass  # not a manifest the signer could sign
    return label, dump_json(document)


def manifest_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    encoding = _pick(rng, corpus.updates)
    manifest = corpus.manifest(encoding.payload, encoding.base_version, _pick(rng, (64, 200, 1024)))
    label, data = _manifest_variant(rng, corpus, manifest)
    fingerprint = wire.model_fingerprint(encoding.base)

    def run() -> str:
        parsed = UpdateManifest.from_json(data)
        expect(UpdateManifest.from_json(parsed.to_json()) == parsed, "a parsed manifest does not survive to_json")
        verify_manifest(parsed, trusted_key=corpus.key.trusted_key, run_id=RUN_ID, model_fingerprint=fingerprint,
                        now=NOW)
        return ACCEPTED
    return label, data, run


Event = tuple[Any, ...]  # ("manifest", bytes) or ("chunk", key, index, bytes)


def _deliveries(rng: np.random.Generator, manifest_json: bytes, manifest: UpdateManifest,
                payload: bytes) -> list[Event]:
    """The manifest and its chunks, now and then shuffled, duplicated, or with the chunks first."""
    chunks: list[Event] = [("chunk", manifest.key, index, chunk)
                           for index, chunk in enumerate(wire.split_chunks(payload, manifest.chunk_size))]
    if rng.random() < 0.2:
        chunks = [chunks[int(index)] for index in rng.permutation(len(chunks))]
    if rng.random() < 0.1:
        chunks.append(_pick(rng, chunks))
    announcements: list[Event] = [("manifest", manifest_json)] * (2 if rng.random() < 0.1 else 1)
    return chunks + announcements if rng.random() < 0.15 else announcements + chunks


def receiver_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    model = _pick(rng, tuple(MODELS))
    encoding = _pick(rng, [e for e in corpus.updates if e.model == model and e.base_version in (None, 0)])
    chunk_size = _pick(rng, (64, 200, 1024, 4096))
    manifest = corpus.manifest(encoding.payload, encoding.base_version, chunk_size)
    kind = _pick(rng, ("genuine", "payload", "payload", "manifest", "manifest", "chunks", "forged", "sequence",
                       "wrong-base", "flood"))
    label, shown, events = kind, manifest.to_json(), _deliveries(rng, manifest.to_json(), manifest, encoding.payload)
    if kind == "payload":
        label, shown = _mutated_update(rng, corpus, encoding)
        resigned = corpus.resigned_for(shown, encoding, chunk_size, rng)
        events = _deliveries(rng, resigned.to_json(), resigned, shown)
    elif kind == "manifest":
        label, shown = _manifest_variant(rng, corpus, manifest)
        events = _deliveries(rng, shown, manifest, encoding.payload)
    elif kind == "forged":
        label, forged = corpus.forged(manifest, rng)
        shown, events = forged.to_json(), _deliveries(rng, forged.to_json(), manifest, encoding.payload)
    elif kind == "chunks":
        for _ in range(int(rng.integers(1, 4))):
            key = _pick(rng, (manifest.key, manifest.key, "1", "2-from-1", "x" * 32, ""))
            index = _pick(rng, (0, 1, manifest.chunk_count, 2**32 - 1, int(rng.integers(manifest.chunk_count + 2))))
            label, shown = mutate(encoding.payload[:chunk_size], rng, corpus.payloads)
            events.insert(int(rng.integers(len(events) + 1)), ("chunk", key, index, shown))
        label = "chunks:" + label
    elif kind in ("sequence", "wrong-base"):  # a snapshot v1, its replay, then the update v1 -> v2 (alone: wrong base)
        full, step = corpus.chains[model]
        first, second = corpus.manifest(full.payload, None, chunk_size), corpus.manifest(step.payload, 1, chunk_size)
        events = ([] if kind == "wrong-base" else _deliveries(rng, first.to_json(), first, full.payload)
                  + [("manifest", first.to_json())]) + _deliveries(rng, second.to_json(), second, step.payload)
    elif kind == "flood":  # unannounced chunks past the budgets, announcements past the key limit, then the update
        flood: list[Event] = [("chunk", _pick(rng, (str(number), manifest.key, "9")), int(rng.integers(0, 3)),
                               rng.bytes(_pick(rng, (16, 4096, MAX_INPUT_BYTES))))
                              for number in range(int(rng.integers(5, 25)))]
        flood += [("manifest", dataclasses.replace(manifest, key=str(target), target_version=target).signed(corpus.key)
                   .to_json()) for target in range(2, int(rng.integers(3, 14)))]
        label = f"flood of {len(flood)}"
        events = [flood[int(index)] for index in rng.permutation(len(flood))] + events

    def run() -> str:
        receiver = UpdateReceiver(corpus.initial[model], INIT_SEED, corpus.trust)
        refused = applied = 0
        for event in events:
            try:
                completed = (receiver.add_manifest_payload(event[1]) if event[0] == "manifest"
                             else receiver.add_chunk(event[1], event[2], event[3]))
                if completed is not None:
                    held = receiver.version
                    version, weights = receiver.verify(completed)
                    expect(version > held and wire.weights_hash(weights).hex() == completed.manifest.post_apply_sha256,
                           "verify passed an update that is not newer, or not the signed weights")
                    receiver.commit(version, weights)
                    applied += 1
            except UpdateRejected:
                refused += 1
        # Every refusal raised is counted; chunks dropped when their manifest arrives are counted without one.
        expect(receiver.rejected_updates >= refused, "a refusal was not counted")
        return ACCEPTED if applied else REJECTED if receiver.rejected_updates else IGNORED
    return label, shown, run


def topics_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    topics = Topics(RUN_ID)
    text = _pick(rng, (topics.update_chunk("12", 3), topics.update_chunk("12-from-11", 0), topics.manifest,
                       topics.device_update_chunk("dev-a", "5", 17), topics.config,
                       *(topics.device("dev-a", kind) for kind in DEVICE_MESSAGE_KINDS)))
    roll, label = rng.random(), "genuine"
    if 0.1 <= roll < 0.15:
        label, text = "random", "".join(map(chr, rng.integers(0, 0x800, int(rng.integers(0, 80)))))
    elif roll >= 0.15:
        edits = []
        for _ in range(int(rng.integers(1, 4))):
            edit = _pick(rng, ("insert", "delete", "replace", "digits", "long-key", "run"))
            at = int(rng.integers(len(text) + 1))
            edits.append(edit)
            if edit == "insert":
                text = text[:at] + _pick(rng, TOPIC_PIECES) + text[at:]
            elif edit == "delete":
                text = text[:at] + text[at + int(rng.integers(1, 8)):]
            elif edit == "replace":
                text = text[:at] + _pick(rng, TOPIC_PIECES) + text[at + 1:]
            elif edit == "digits":  # the 4,301 digits of issue 11, and the bounds around the limit
                digits = _pick(rng, (MAX_CHUNK_INDEX_DIGITS, MAX_CHUNK_INDEX_DIGITS + 1, 4301, 20000))
                text = text.rstrip("0123456789") + "9" * digits
            elif edit == "long-key":
                text = topics.update_chunk("7" * _pick(rng, (MAX_UPDATE_KEY_CHARS, MAX_UPDATE_KEY_CHARS + 1, 5000)), 1)
            else:
                text = text.replace(topics.prefix, _pick(rng, ("testbed/other/", "testbed//", "", "testbed/fuzz-run")))
        label = "+".join(edits)

    def run() -> str:
        chunk, device = topics.parse_update_chunk(text), topics.parse_device_topic(text)
        if chunk is not None:
            key, index = chunk
            expect(0 < len(key) <= MAX_UPDATE_KEY_CHARS and "/" not in key and type(index) is int
                   and 0 <= index < 10**MAX_CHUNK_INDEX_DIGITS and int(text.rsplit("/", 1)[1]) == index,
                   "parse_update_chunk returned a key or index outside its bounds")
        if device is not None:
            expect(device[1] in DEVICE_MESSAGE_KINDS and topics.device(*device) == text,
                   "parse_device_topic returned a device topic that does not spell the topic")
        return ACCEPTED if chunk or device else REJECTED
    return label, text.encode("utf-8", "surrogatepass"), run


def serial_frames_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    limit = _pick(rng, (DEFAULT_MAX_FRAME_BYTES, 64, 300))
    pieces = []
    for _ in range(int(rng.integers(1, 6))):
        most = max_payload_bytes(limit) if rng.random() < 0.3 else min(64, max_payload_bytes(limit))
        if rng.random() < 0.15:  # any type byte, any length, a valid CRC: gets past the CRC check
            body = rng.bytes(int(rng.integers(0, 20))) if rng.random() < 0.5 else HEADER.pack(
                int(rng.integers(256)), 0, 1, 1) + rng.bytes(int(rng.integers(0, most + 1)))
            pieces.append(b"\x00" + cobs_encode(body + zlib.crc32(body).to_bytes(4, "little")) + b"\x00")
            continue
        pieces.append(encode_frame(_pick(rng, tuple(MessageType)), int(rng.integers(0, 65536)),
                                   rng.bytes(int(rng.integers(0, most + 1))), flags=int(rng.integers(0, 256)),
                                   session=int(rng.integers(0, 2**32)), max_frame_bytes=limit))
        if rng.random() < 0.2:
            pieces.append(random_bytes(rng, 64))  # line noise between frames
    roll, data = rng.random(), b"".join(pieces)
    label, data = (("genuine", data) if roll < 0.15 else ("random", random_bytes(rng, 2048)) if roll < 0.2
                   else mutate(data, rng, [data]))
    cuts = sorted(int(cut) for cut in rng.integers(0, len(data) + 1, int(rng.integers(0, 8))))

    def run() -> str:
        whole, piecewise = FrameDecoder(limit), FrameDecoder(limit)
        frames = whole.feed(data)
        in_pieces = [frame for start, end in zip([0, *cuts], [*cuts, len(data)])
                     for frame in piecewise.feed(data[start:end])]
        # The reason a cut frame is dropped for may depend on where reads end (oversize or bad_cobs); not the drops.
        expect(frames == in_pieces and sum(whole.errors.values()) == sum(piecewise.errors.values()),
               "the stream decodes otherwise when fed in pieces")
        expect(whole.buffered_bytes <= limit
               and all(len(frame.payload) <= max_payload_bytes(limit) for frame in frames),
               "the decoder holds or returns more than max_frame_bytes")
        return REJECTED if sum(whole.errors.values()) else ACCEPTED if frames else IGNORED
    return f"max {limit} B {label}", data, run


def serial_payloads_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    name, parse, genuine, fields = _pick(rng, corpus.serial_payloads)
    roll, label, data = rng.random(), "genuine", genuine
    if 0.05 <= roll < 0.1:
        label, data = "random", random_bytes(rng)
    elif name == "board-config" and roll >= 0.1:
        if roll < 0.15:
            label, data = "zlib-bomb", corpus.zlib_bomb
        elif roll < 0.6:
            label, document = mutate_json(corpus.board_config, rng)
            data = zlib.compress(dump_json(document))
        else:
            label, data = mutate(genuine, rng, [genuine])
    elif name in ("hello", "json") and roll >= 0.5:
        label, document = mutate_json(json.loads(genuine), rng)
        data = dump_json(document)
    elif roll >= 0.1:
        label, data = mutate(genuine, rng, [item[2] for item in corpus.serial_payloads], fields)
        if name == "frame-body" and len(data) >= 4 and rng.random() < 0.5:
            label, data = label + "+crc", data[:-4] + zlib.crc32(data[:-4]).to_bytes(4, "little")

    def run() -> str:
        result = parse(data)
        if name == "update-chunk":
            expect(result.to_payload() == data,  # type: ignore[attr-defined]
                   "an update chunk does not encode back to its payload")
        elif name == "sync":
            expect(session_payload(*result) == data, "a SYNC payload does not encode back")  # type: ignore[misc]
        elif name == "frame-body" and isinstance(result, Frame):
            again = encode_frame(result.message_type, result.sequence, result.payload, flags=result.flags,
                                 session=result.session, max_frame_bytes=len(data))
            expect(again == b"\x00" + cobs_encode(data) + b"\x00", "a frame body does not encode back to itself")
        return REJECTED if isinstance(result, DecodeError) else ACCEPTED
    return f"{name} {label}", data, run


def serial_link_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    window, max_sends = _pick(rng, (1, 4, 32)), _pick(rng, (1, 3, 8))
    ours, peer = int(rng.integers(1, 2**31)), int(rng.integers(1, 2**32))
    events: list[Frame | None] = []  # None: the timer fires
    if rng.random() < 0.8:
        events.append(Frame(MessageType.SYNC, 0, session_payload(peer, 0), session=peer))
    sequence = 1
    for _ in range(int(rng.integers(1, 25))):
        kind = _pick(rng, tuple(MessageType))
        if kind in CONTROL_TYPES:
            payload = Ack(_pick(rng, (0, int(rng.integers(0, 65536)))),
                          _pick(rng, (ours, 0, peer, int(rng.integers(2**32)))), "lost").to_payload()
        elif kind == MessageType.SYNC:
            payload = session_payload(_pick(rng, (peer, peer % (2**32 - 1) + 1, int(rng.integers(1, 2**32)))),
                                      _pick(rng, (0, ours)))
        else:
            payload = random_bytes(rng, 32)
        if rng.random() < 0.2:
            payload = mutate(payload, rng, [payload], struct_fields(ACK_HEADER))[1]
        number = sequence if rng.random() < 0.6 else _pick(rng, ((sequence + int(rng.integers(-3, 70))) % 65536,
                                                                 int(rng.integers(65536))))
        sequence = (number + 1) % 65536
        events.append(Frame(kind, number, payload, int(rng.integers(0, 4)),
                            peer if rng.random() < 0.8 else _pick(rng, (0, int(rng.integers(2**32))))))
        if rng.random() < 0.1:
            events.append(None)

    def run() -> str:
        sessions = iter(range(ours, ours + 1_000_000))
        protocol = LinkProtocol(LinkSettings(window=window, ack_timeout_s=1.0, max_sends=max_sends),
                                lambda: next(sessions))
        protocol.start(0.0)
        delivered = refused = 0
        for step_index, frame in enumerate(events, 1):
            now = 0.3 * step_index
            if frame is None:
                protocol.on_timer(now)
                continue
            dropped = protocol.stale_frames + protocol.duplicates
            step = protocol.on_frame(frame, now)
            expect(all(item.session == protocol.peer_session and item.message_type not in CONTROL_TYPES
                       and item.message_type != MessageType.SYNC for item in step.deliver),
                   "delivered a link control frame, or a frame of another session")
            delivered += len(step.deliver)
            refused += protocol.stale_frames + protocol.duplicates > dropped or any(
                reply.message_type == MessageType.NACK and Ack.from_payload(reply.payload).session == 0
                for reply in step.transmit)
        return ACCEPTED if delivered else REJECTED if refused else IGNORED
    return f"window {window}, {len(events)} frames", b"".join(
        b"" if frame is None else HEADER.pack(frame.message_type, frame.flags, frame.sequence, frame.session)
        + frame.payload for frame in events), run


def messages_case(rng: np.random.Generator, corpus: Corpus) -> Case:
    name, decode, genuine = _pick(rng, corpus.messages)
    roll, label, data = rng.random(), "genuine", genuine
    limit = MAX_CONFIG_MESSAGE_BYTES if "config" in name else MAX_DEVICE_MESSAGE_BYTES
    if 0.05 <= roll < 0.1:
        label, data = "random", random_bytes(rng)
    elif 0.1 <= roll < 0.13:  # at and just past the size limit
        label, data = "size-limit", genuine[:-1] + b" " * (limit - len(genuine) + int(rng.integers(0, 2))) + b"}"
    elif 0.13 <= roll < 0.4:
        label, data = mutate(genuine, rng, [item[2] for item in corpus.messages])
    elif roll >= 0.4:
        label, document = mutate_json(json.loads(genuine), rng)
        data = dump_json(document)

    def run() -> str:
        message = decode(data)
        if message is not None and len(data) < 16384:
            encoded = message.encode()  # type: ignore[attr-defined]
            expect(type(message).decode(encoded).encode() == encoded,
                   "a decoded message does not survive encode/decode")
        return ACCEPTED
    return f"{name} {label}", data, run


@dataclass(frozen=True)
class Target:
    """One family of parsers: how to make an input, the errors its documentation names, its share of the inputs."""

    name: str
    parsers: str
    documented: tuple[type[BaseException], ...]
    rejection: str
    share: int
    make: Callable[[np.random.Generator, Corpus], Case]


TARGETS = {target.name: target for target in (
    Target("wire", "wire.decode_header, decode_update, apply_update, join_chunks", (WireError,), "WireError", 18,
           wire_case),
    Target("codecs", "index codecs (dense, raw, bitmap, golomb-rice) decode; value codecs (fp32, fp16, int8) "
           "unpack, held",
           (WireError,), "WireError", 12, codecs_case),
    Target("manifest", "UpdateManifest.from_json, verify_manifest", (ManifestError, UpdateRejected),
           "ManifestError, UpdateRejected", 12, manifest_case),
    Target("receiver", "UpdateReceiver.add_manifest_payload, add_chunk, verify (devices.assembly)", (UpdateRejected,),
           "UpdateRejected", 8, receiver_case),
    Target("topics", "Topics.parse_update_chunk, parse_device_topic", (), "None", 10, topics_case),
    Target("serial-frames", "FrameDecoder.feed, whole and in pieces", (), "a drop counted by DecodeError", 10,
           serial_frames_case),
    Target("serial-payloads", "cobs_decode, parse_frame_body, UpdateChunk/Ack/Hello.from_payload, parse_session/json/"
           "log_payload, board_config_from_payload", (SerialFrameError,), "SerialFrameError, DecodeError", 10,
           serial_payloads_case),
    Target("serial-link", "frame_order.LinkProtocol.on_frame, on_timer", (SerialLinkError,),
           "a stale/duplicate count, a NACK 'no session', PeerUnresponsive", 6, serial_link_case),
    Target("messages", "decode_device_message, RunConfig/BoardConfig.decode, decode_config_topic", (MessageError,),
           "MessageError", 14, messages_case),
)}


# --- running ----------------------------------------------------------------------------------------------------

def _timed_out(signum: int, frame: object) -> None:
    raise InputTimeout()


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _hex(data: bytes) -> str:
    return data[:HEX_SHOWN].hex() + ("…" if len(data) > HEX_SHOWN else "") + f" ({len(data)} B)"


def run_target(name: str, count: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """Fuzz one target with `count` inputs in this process: outcomes, the first failures, timings and peak RSS."""
    target = TARGETS[name]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1 + list(TARGETS).index(name),))))
    corpus = Corpus(seed)
    signal.signal(signal.SIGALRM, _timed_out)
    rss_start = _max_rss_mib()
    outcomes: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    durations = np.zeros(count)
    slowest = (0.0, "", "")
    for number in range(count):
        label, shown, run = target.make(rng, corpus)
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            outcome = run()
        except target.documented:
            outcome = REJECTED
        except (Exception, InputTimeout) as error:  # noqa: BLE001 — anything else is what the benchmark looks for
            outcome = OTHER
            if len(failures) < FAILURES_SHOWN:
                failures.append({"label": label, "input": _hex(shown),
                                 "error": f"{type(error).__name__}: {str(error)[:300]}",
                                 "traceback": "".join(traceback.format_exception(error)[-4:])[-1500:]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        durations[number] = time.perf_counter() - started
        outcomes[outcome] += 1
        if durations[number] > slowest[0]:
            slowest = (float(durations[number]), label, _hex(shown))
    return {"target": name, "inputs": count, **{key: outcomes[key] for key in (REJECTED, ACCEPTED, IGNORED, OTHER)},
            "failures": failures, "slowest_s": slowest[0], "slowest_label": slowest[1], "slowest_input": slowest[2],
            "median_input_us": float(np.median(durations)) * 1e6 if count else 0.0,
            "rss_start_mib": rss_start, "rss_peak_mib": _max_rss_mib()}


def shares(total: int, names: Sequence[str]) -> dict[str, int]:
    """`total` inputs split among the targets by their shares (largest remainders; each gets at least one)."""
    weights = {name: TARGETS[name].share for name in names}
    exact = {name: total * weight / sum(weights.values()) for name, weight in weights.items()}
    counts = {name: max(1, int(value)) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    for name in by_remainder[:max(0, total - sum(counts.values()))]:
        counts[name] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs in all, shared by the targets")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_INPUTS} inputs in all (the test's subset)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="targets fuzzed at once")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds one input may take before it fails (checked between Python bytecodes: a parser "
                             "stuck in one C call is caught when the call returns)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    names = args.targets.split(",")
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    total = QUICK_INPUTS if args.quick else args.inputs
    counts = shares(total, names)
    started = time.monotonic()
    # A fresh process per target: its peak RSS is its own, and one target's state cannot mask another's failure.
    with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.starmap(run_target, [(name, counts[name], args.seed, args.timeout) for name in names],
                               chunksize=1)
    wall_s = time.monotonic() - started
    others = sum(result[OTHER] for result in results)
    rerun = f"python bench/fuzz.py --seed {args.seed} " + ("--quick" if args.quick else f"--inputs {total}")
    if names != list(TARGETS):
        rerun += f" --targets {args.targets}"
    print(f"# bench/fuzz.py: {sum(counts.values())} inputs over {len(names)} targets (random bytes and mutations of "
          f"valid encodings), seed {args.seed}, {args.jobs} processes, {wall_s:.1f} s wall")
    print(f"# rerun: {rerun}")
    print("reference: 0 undocumented exceptions (issue 11); the slowest input beside its target's median input; peak "
          "RSS = getrusage ru_maxrss of the target's own process, beside its RSS when fuzzing began")
    print("| target | inputs | documented rejections | accepted | ignored | other exceptions | slowest input s "
          "| median input µs | peak RSS MiB (at start) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(f"| {result['target']} | {result['inputs']} | {result[REJECTED]} | {result[ACCEPTED]} "
              f"| {result[IGNORED]} | {result[OTHER]} | {result['slowest_s']:.4f} | {result['median_input_us']:.0f} "
              f"| {result['rss_peak_mib']:.0f} ({result['rss_start_mib']:.0f}) |")
    print(f"| **total** | {sum(r['inputs'] for r in results)} | {sum(r[REJECTED] for r in results)} "
          f"| {sum(r[ACCEPTED] for r in results)} | {sum(r[IGNORED] for r in results)} | **{others}** "
          f"| {max(r['slowest_s'] for r in results):.4f} | | {max(r['rss_peak_mib'] for r in results):.0f} |")
    print("targets (parsers -> their documented rejection; ignored: no error and nothing taken):")
    for name in names:
        print(f"  {name}: {TARGETS[name].parsers} -> {TARGETS[name].rejection}")
    for result in results:
        print(f"  slowest {result['target']} input: {result['slowest_label']} {result['slowest_input']}")
    for result in results:
        for failure in result["failures"]:
            print(f"FAILURE {result['target']} [{failure['label']}] {failure['error']}\n  input {failure['input']}\n"
                  + "    " + failure["traceback"].replace("\n", "\n    "))
    print(f"other exceptions: {others} (target 0) -> {'met' if others == 0 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "wall_seconds": wall_s, "command": rerun,
                                         "targets": results}, indent=1))
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main())

"""The frozen wire vectors of tests/protocol/vectors.json against the codec.

The vectors were generated once and are never regenerated here: a codec change
that alters the bytes on the wire must fail these tests (and bump the protocol
version, see docs/protocol.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest

from sshrelay.protocol import errors
from sshrelay.protocol.codec import FrameDecoder, encode_frame
from sshrelay.protocol.errors import RemoteProtocolError
from sshrelay.protocol.frames import (
    BIN,
    FRAME_CLASSES,
    FRAME_FIELDS,
    META,
    Frame,
    FrameType,
    Ping,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors.json").read_text(encoding="utf-8")
)
PROTOCOL_MD = Path(__file__).parents[2] / "docs" / "protocol.md"
DEFAULT_MAX_PAYLOAD: int = VECTORS["default_max_payload"]

# Malformed vectors the current codec accepts although the spec rejects them.
# Strict xfail: once the codec is fixed these XPASS and the entry must go.
KNOWN_BUGS: dict[str, str] = {}


def _field_from_json(kind: str, value: Any) -> Any:
    """Schema-driven: bin fields and bytes values inside meta are {"hex": ...}."""
    if kind == BIN:
        assert set(value) == {"hex"}
        return bytes.fromhex(value["hex"])
    if kind == META:
        return {
            key: bytes.fromhex(item["hex"]) if isinstance(item, dict) else item
            for key, item in value.items()
        }
    return value


def frame_from_json(obj: dict[str, Any]) -> Frame:
    frame_type = FrameType[obj["type"]]
    cls = FRAME_CLASSES[frame_type]
    names = [field.name for field in dataclasses.fields(cast(Any, cls))]
    assert list(obj) == ["type", *names], f"fields of {obj['type']} out of order or missing"
    kinds = FRAME_FIELDS[frame_type]
    return cls(
        *(_field_from_json(kind, obj[name]) for kind, name in zip(kinds, names, strict=True))
    )


def _params(section: str, xfail_known: bool = False) -> list[Any]:
    params = []
    for vector in VECTORS[section]:
        marks = []
        if xfail_known and vector["name"] in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[vector["name"]]))
        params.append(pytest.param(vector, id=vector["name"], marks=marks))
    return params


def _decoder(vector: dict[str, Any]) -> FrameDecoder:
    return FrameDecoder(vector.get("max_payload", DEFAULT_MAX_PAYLOAD))


# ---------------------------------------------------------------------- valid


@pytest.mark.parametrize("vector", _params("valid"))
def test_valid_vector_decodes_to_frame(vector: dict[str, Any]) -> None:
    frame = frame_from_json(vector["frame"])
    decoder = _decoder(vector)
    assert decoder.feed(bytes.fromhex(vector["hex"])) == [frame]
    assert decoder.buffered() == 0


@pytest.mark.parametrize("vector", _params("valid"))
def test_valid_vector_encodes_to_hex(vector: dict[str, Any]) -> None:
    frame = frame_from_json(vector["frame"])
    assert encode_frame(frame).hex() == vector["hex"]


@pytest.mark.parametrize("vector", _params("valid"))
def test_valid_vector_is_plain_msgpack(vector: dict[str, Any]) -> None:
    """A peer needs nothing but a msgpack library: the bytes are [type, *fields]."""
    frame = frame_from_json(vector["frame"])
    fields = [getattr(frame, field.name) for field in dataclasses.fields(cast(Any, frame))]
    reference = msgpack.packb([int(frame.TYPE), *fields], use_bin_type=True)
    assert reference.hex() == vector["hex"]


@pytest.mark.parametrize("vector", _params("valid"))
def test_valid_vector_fed_one_byte_at_a_time(vector: dict[str, Any]) -> None:
    wire = bytes.fromhex(vector["hex"])
    decoder = _decoder(vector)
    for index in range(len(wire) - 1):
        assert decoder.feed(wire[index : index + 1]) == [], f"frame completed early at {index}"
    assert decoder.feed(wire[-1:]) == [frame_from_json(vector["frame"])]
    assert decoder.buffered() == 0


def test_all_valid_vectors_back_to_back() -> None:
    wire = b"".join(bytes.fromhex(vector["hex"]) for vector in VECTORS["valid"])
    expected = [frame_from_json(vector["frame"]) for vector in VECTORS["valid"]]
    assert FrameDecoder(DEFAULT_MAX_PAYLOAD).feed(wire) == expected


def test_vectors_cover_every_frame_type() -> None:
    covered = {vector["frame"]["type"] for vector in VECTORS["valid"]}
    assert covered == {frame_type.name for frame_type in FrameType}


def test_protocol_md_examples_match_vectors() -> None:
    """Every annotated example in docs/protocol.md is the frozen vector of the same name."""
    valid = {vector["name"]: vector["hex"] for vector in VECTORS["valid"]}
    blocks = re.findall(
        r"<!-- vector: (.*?) -->\n```text\n(.*?)```", PROTOCOL_MD.read_text("utf-8"), re.S
    )
    assert len(blocks) >= 10
    for name, block in blocks:
        wire = "".join("".join(line.split("#", 1)[0].split()) for line in block.splitlines())
        assert wire == valid[name], name


# ---------------------------------------------------------------------- decode-only


@pytest.mark.parametrize("vector", _params("decode_only"))
def test_noncanonical_vector_decodes(vector: dict[str, Any]) -> None:
    """Decoders accept any msgpack form; encoders emit the shortest one."""
    wire = bytes.fromhex(vector["hex"])
    frame = frame_from_json(vector["frame"])
    assert _decoder(vector).feed(wire) == [frame]
    canonical = encode_frame(frame)
    assert canonical != wire
    assert _decoder(vector).feed(canonical) == [frame]


# ---------------------------------------------------------------------- malformed


def _error_class(vector: dict[str, Any]) -> type[RemoteProtocolError]:
    cls = getattr(errors, vector["error"])
    assert issubclass(cls, RemoteProtocolError)
    return cls  # type: ignore[no-any-return]


@pytest.mark.parametrize("vector", _params("malformed", xfail_known=True))
def test_malformed_vector_raises_named_error(vector: dict[str, Any]) -> None:
    cls = _error_class(vector)
    decoder = _decoder(vector)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(bytes.fromhex(vector["hex"]))
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    # The decoder stays failed: no resynchronisation, not even on valid input.
    with pytest.raises(cls) as again:
        decoder.feed(encode_frame(Ping(1)))
    assert again.value is info.value
    with pytest.raises(cls):
        decoder.feed(b"")


@pytest.mark.parametrize("vector", _params("malformed", xfail_known=True))
def test_malformed_vector_fed_one_byte_at_a_time(vector: dict[str, Any]) -> None:
    cls = _error_class(vector)
    wire = bytes.fromhex(vector["hex"])
    decoder = _decoder(vector)
    with pytest.raises(RemoteProtocolError) as info:
        for index in range(len(wire)):
            decoder.feed(wire[index : index + 1])
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"

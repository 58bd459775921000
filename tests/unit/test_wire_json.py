"""`wire_json`: orjson's speed, the standard library's answers; the watch's line reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from m2m_token_operator.kube import wire_json
from m2m_token_operator.kube.reflector import _lines


def test_a_document_decodes_as_the_standard_library_decodes_it() -> None:
    document = (
        b'{"kind":"Secret","metadata":{"name":"orders","labels":{"a":"\xc3\xa9"}},'
        b'"n":[1,2.5,null,true]}'
    )
    assert wire_json.loads(document) == json.loads(document)
    assert wire_json.loads(document.decode()) == json.loads(document)


@pytest.mark.parametrize(
    "document",
    [
        b'{"name": "\\ud800"}',  # a lone surrogate: orjson refuses
        b'{"ratio": NaN}',  # not JSON, but Python's json has always read it
    ],
)
def test_what_orjson_refuses_is_decoded_by_the_standard_library(document: bytes) -> None:
    decoded = wire_json.loads(document)
    assert json.dumps(decoded) == json.dumps(json.loads(document))


def test_integers_of_64_bits_are_exact_and_larger_ones_are_floats() -> None:
    # The API server's integers are int64 (generation, observedGeneration, expirationSeconds).
    assert wire_json.loads(b"[9223372036854775807, -9223372036854775808]") == [2**63 - 1, -(2**63)]
    assert wire_json.loads(b"[123456789012345678901234567890]") == [1.2345678901234568e29]


@pytest.mark.parametrize("document", [b"", b"{", b'{"a": 1} trailing', b"\xff\xfe"])
def test_what_is_not_json_is_a_value_error(document: bytes) -> None:
    # JSONDecodeError, or UnicodeDecodeError for bytes that are no text: both ValueErrors.
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        wire_json.loads(document)


def test_a_body_encodes_compactly_and_decodes_to_itself() -> None:
    body = {"metadata": {"name": "orders", "annotations": {"note": "é ü"}}, "data": {"k": "dg=="}}
    encoded = wire_json.dumps(body)
    assert isinstance(encoded, bytes)
    assert b" " not in encoded.replace("é ü".encode(), b"")
    assert json.loads(encoded) == body


@pytest.mark.parametrize(
    "value",
    [{"size": 2**70}, {"name": "\ud800"}, {1: "an int key"}],
    ids=["big int", "lone surrogate", "int key"],
)
def test_what_orjson_cannot_encode_is_encoded_by_the_standard_library(value: Any) -> None:
    assert wire_json.dumps(value) == json.dumps(value, separators=(",", ":")).encode()


def test_what_json_cannot_hold_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        wire_json.dumps({"a": object()})


class _Stream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        yield from self.chunks


def test_watch_lines_however_the_chunks_fall() -> None:
    chunks = [b'{"a":1}\n{"b":2}\n{"c"', b":3", b'}\n\n{"d":4}\n', b'{"e":5}']
    assert list(_lines(_Stream(chunks))) == [
        b'{"a":1}',
        b'{"b":2}',
        b'{"c":3}',
        b'{"d":4}',
        b'{"e":5}',
    ]

"""The GraphDef reader on hand-encoded protobuf messages (wire format by the book)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from recon.identity.protobuf_graph import (
    ProtobufError,
    iter_fields,
    parse_graph,
    parse_tensor,
    strip_control_inputs,
)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def shape(*dims: int) -> bytes:
    return b"".join(field(2, field(1, d)) for d in dims)


def test_varints_and_nested_messages() -> None:
    msg = field(1, 300) + field(2, b"abc") + varint(3 << 3 | 5) + struct.pack("<f", 1.5)
    fields = list(iter_fields(msg))
    assert fields[0] == (1, 0, 300)
    assert bytes(fields[1][2]) == b"abc"
    assert struct.unpack("<f", fields[2][2])[0] == 1.5


def test_tensor_encodings() -> None:
    content = np.arange(6, dtype="<f4")
    t = parse_tensor(field(1, 1) + field(2, shape(2, 3)) + field(4, content.tobytes()))
    np.testing.assert_array_equal(t.array, content.reshape(2, 3))
    # One repeated value fills the shape (TensorFlow's splat), packed floats.
    t = parse_tensor(field(1, 1) + field(2, shape(2, 2)) + field(5, struct.pack("<f", 0.25)))
    np.testing.assert_array_equal(t.array, np.full((2, 2), 0.25, np.float32))
    # int_val: packed varints; negative values are 10-byte two's complement.
    ints = varint(3) + varint((1 << 64) - 1)
    t = parse_tensor(field(1, 3) + field(2, shape(2)) + field(7, ints))
    np.testing.assert_array_equal(t.array, np.array([3, -1], np.int32))
    scalar = parse_tensor(field(1, 1) + field(5, struct.pack("<f", 0.17)))
    assert scalar.shape == () and float(scalar.array) == pytest.approx(0.17)


def test_malformed_input_is_a_clear_error() -> None:
    with pytest.raises(ProtobufError, match="past the end"):
        list(iter_fields(field(1, b"abcdef")[:-2]))
    with pytest.raises(ProtobufError, match="truncated varint"):
        list(iter_fields(b"\x08\xff"))
    with pytest.raises(ProtobufError, match="values for shape"):
        parse_tensor(field(1, 1) + field(2, shape(3)) + field(4, b"\x00" * 8))
    with pytest.raises(ProtobufError, match="unsupported tensor dtype"):
        parse_tensor(field(1, 7))  # DT_STRING
    with pytest.raises(ProtobufError, match="no nodes"):
        parse_graph(field(4, b"versions"))


def test_graph_nodes_and_control_inputs() -> None:
    tensor = field(1, 1) + field(2, shape(1)) + field(5, struct.pack("<f", 2.0))
    attr = field(5, field(1, b"value") + field(2, field(8, tensor)))
    const = field(1, b"c") + field(2, b"Const") + field(3, b"^x") + attr
    add = field(1, b"y") + field(2, b"Add") + field(3, b"c") + field(3, b"input:0")
    graph = field(1, const) + field(1, add) + field(4, b"\x08\x1a")
    nodes = parse_graph(graph)
    assert [(n.name, n.op, n.inputs) for n in nodes] == [
        ("c", "Const", ["^x"]), ("y", "Add", ["c", "input:0"])]
    np.testing.assert_array_equal(nodes[0].attr["value"].array, [2.0])
    stripped = strip_control_inputs(graph)
    assert [n.inputs for n in parse_graph(stripped)] == [[], ["c", "input:0"]]
    assert strip_control_inputs(stripped) == stripped
    assert len(stripped) == len(graph) - len(field(3, b"^x"))

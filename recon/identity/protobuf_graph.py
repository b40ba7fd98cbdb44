"""A small reader of TensorFlow ``GraphDef`` protobuf files, without TensorFlow.

It decodes the protobuf wire format directly (varints and length-delimited fields) and
understands just enough of TensorFlow's schema (``graph.proto``, ``node_def.proto``,
``attr_value.proto``, ``tensor.proto``, ``tensor_shape.proto``) to list the nodes of a
frozen graph and read its ``Const`` tensors as numpy arrays. That is all a conversion of a
frozen graph's weights onto a PyTorch module needs.

Field numbers (from TensorFlow's .proto files):
  GraphDef:         1 node (NodeDef, repeated)
  NodeDef:          1 name, 2 op, 3 input (repeated), 4 device, 5 attr (map<string, AttrValue>)
  AttrValue:        1 list, 2 s, 3 i, 4 f, 5 b, 6 type, 7 shape, 8 tensor, 9 placeholder
  TensorProto:      1 dtype, 2 tensor_shape, 4 tensor_content, 5 float_val, 6 double_val,
                    7 int_val, 8 string_val, 10 int64_val, 11 bool_val, 13 half_val
  TensorShapeProto: 2 dim (Dim: 1 size, 2 name), 3 unknown_rank
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# TensorFlow DataType enum -> numpy dtype (the types a frozen graph's constants use).
_TF_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),   # DT_FLOAT
    2: np.dtype("<f8"),   # DT_DOUBLE
    3: np.dtype("<i4"),   # DT_INT32
    4: np.dtype("u1"),    # DT_UINT8
    5: np.dtype("<i2"),   # DT_INT16
    6: np.dtype("i1"),    # DT_INT8
    9: np.dtype("<i8"),   # DT_INT64
    10: np.dtype("?"),    # DT_BOOL
    19: np.dtype("<f2"),  # DT_HALF
}


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message of the expected shape."""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint longer than 10 bytes")


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)`` for each field of one message.

    ``value`` is an int for varints, a memoryview of the raw bytes for fixed-width and
    length-delimited fields (nested messages, strings, packed arrays)."""
    view = memoryview(buf)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = _read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            value, pos = _read_varint(view, pos)
            yield number, wire, value
        elif wire == _LEN:
            length, pos = _read_varint(view, pos)
            if pos + length > end:
                raise ProtobufError(f"field {number}: length {length} past the end")
            yield number, wire, view[pos:pos + length]
            pos += length
        elif wire == _I64:
            yield number, wire, view[pos:pos + 8]
            pos += 8
        elif wire == _I32:
            yield number, wire, view[pos:pos + 4]
            pos += 4
        else:
            raise ProtobufError(f"field {number}: unsupported wire type {wire}")
    if pos != end:
        raise ProtobufError("message ends inside a field")


def _packed_varints(value: int | memoryview) -> list[int]:
    if isinstance(value, int):
        return [value]
    out = []
    pos = 0
    while pos < len(value):
        v, pos = _read_varint(value, pos)
        out.append(v)
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class Tensor:
    """A decoded ``TensorProto``: dtype and shape, and the values as a numpy array."""

    dtype: int
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass
class Node:
    """A decoded ``NodeDef``; ``attr`` holds decoded values for the common kinds."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attr: dict[str, object] = field(default_factory=dict)


def _parse_shape(buf: memoryview) -> tuple[int, ...]:
    dims: list[int] = []
    for number, _, value in iter_fields(buf):
        if number == 2:
            size = 0
            for dnum, _, dval in iter_fields(value):
                if dnum == 1:
                    size = _signed64(dval)
            dims.append(size)
    return tuple(dims)


def parse_tensor(buf: bytes | memoryview) -> Tensor:
    """Decode a ``TensorProto`` into a numpy array of its dtype and shape.

    Values come either as raw ``tensor_content`` bytes or as typed repeated fields; a
    single repeated value fills the whole shape (TensorFlow's splat convention)."""
    dtype = 0
    shape: tuple[int, ...] = ()
    content: bytes | None = None
    ints: list[int] = []
    float_chunks: list[np.ndarray] = []
    double_chunks: list[np.ndarray] = []
    for number, wire, value in iter_fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _parse_shape(value)
        elif number == 4:
            content = bytes(value)
        elif number == 5:  # float_val: packed (LEN) or one fixed32
            float_chunks.append(np.frombuffer(value, dtype="<f4"))
        elif number == 6:
            double_chunks.append(np.frombuffer(value, dtype="<f8"))
        elif number in (7, 10, 11, 13):  # int_val, int64_val, bool_val, half_val (varints)
            ints.extend(_signed64(v) for v in _packed_varints(value))
    if dtype not in _TF_DTYPES:
        raise ProtobufError(f"unsupported tensor dtype {dtype}")
    np_dtype = _TF_DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=np_dtype).copy()
    elif float_chunks or double_chunks:
        array = np.concatenate(float_chunks + double_chunks).astype(np_dtype)
    elif ints:
        if dtype == 19:  # half values travel as their uint16 bit patterns
            array = np.asarray(ints, dtype=np.uint16).view(np.float16)
        else:
            array = np.asarray(ints, dtype=np_dtype)
    else:
        array = np.zeros(count, dtype=np_dtype)
    if array.size == 1 and count != 1:
        array = np.full(count, array[0], dtype=np_dtype)
    if array.size != count:
        raise ProtobufError(f"tensor has {array.size} values for shape {shape}")
    return Tensor(dtype=dtype, shape=shape, array=array.reshape(shape))


def _parse_attr_value(buf: memoryview) -> object:
    for number, _, value in iter_fields(buf):
        if number == 2:
            return bytes(value)
        if number == 3:
            return _signed64(value)
        if number == 4:
            return float(np.frombuffer(value, dtype="<f4")[0])
        if number == 5:
            return bool(value)
        if number == 6:
            return ("type", value)
        if number == 7:
            return _parse_shape(value)
        if number == 8:
            return parse_tensor(value)
        if number == 1:
            return _parse_list(value)
    return None


def _parse_list(buf: memoryview) -> list[object]:
    items: list[object] = []
    for number, _, value in iter_fields(buf):
        if number == 2:
            items.append(bytes(value))
        elif number == 3:
            items.extend(_signed64(v) for v in _packed_varints(value))
        elif number == 4:
            items.extend(float(f) for f in np.frombuffer(value, dtype="<f4"))
    return items


def parse_node(buf: bytes | memoryview) -> Node:
    node = Node(name="", op="")
    for number, _, value in iter_fields(buf):
        if number == 1:
            node.name = bytes(value).decode()
        elif number == 2:
            node.op = bytes(value).decode()
        elif number == 3:
            node.inputs.append(bytes(value).decode())
        elif number == 5:  # map entry: 1 key, 2 value
            key, attr = "", None
            for enum, _, evalue in iter_fields(value):
                if enum == 1:
                    key = bytes(evalue).decode()
                elif enum == 2:
                    attr = _parse_attr_value(evalue)
            node.attr[key] = attr
    return node


def parse_graph(data: bytes | memoryview) -> list[Node]:
    """All nodes of a serialised ``GraphDef``, in order."""
    nodes = [parse_node(value) for number, _, value in iter_fields(data) if number == 1]
    if not nodes:
        raise ProtobufError("no nodes; not a TensorFlow GraphDef")
    return nodes


def read_graph(path: str | Path) -> list[Node]:
    """All nodes of a binary ``GraphDef`` file, in file order."""
    try:
        return parse_graph(Path(path).read_bytes())
    except ProtobufError as err:
        raise ProtobufError(f"{path}: {err}") from None


def read_constants(path: str | Path) -> dict[str, np.ndarray]:
    """``{node name: array}`` for every ``Const`` node of a frozen graph."""
    consts: dict[str, np.ndarray] = {}
    for node in read_graph(path):
        if node.op == "Const":
            value = node.attr.get("value")
            if not isinstance(value, Tensor):
                raise ProtobufError(f"Const node {node.name!r} has no tensor value")
            consts[node.name] = value.array
    return consts


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_len(number: int, payload: bytes | memoryview) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + bytes(payload)


def _encode_field(number: int, wire: int, value: int | memoryview) -> bytes:
    if wire == _VARINT:
        return _encode_varint(number << 3) + _encode_varint(int(value))
    if wire == _LEN:
        return _encode_len(number, value)
    return _encode_varint(number << 3 | wire) + bytes(value)


def strip_control_inputs(data: bytes) -> bytes:
    """The same ``GraphDef`` without control-dependency inputs (``^node``).

    In a frozen inference graph those edges only order execution; OpenCV's TensorFlow
    importer rejects them (``simplifySubgraphs`` assertion), so an independent OpenCV
    inference of the graph reads this copy. Every other byte is re-emitted unchanged."""
    out = bytearray()
    for number, wire, value in iter_fields(data):
        if number != 1:
            out += _encode_field(number, wire, value)
            continue
        node = bytearray()
        for field_no, field_wire, field_value in iter_fields(value):
            if field_no == 3 and bytes(field_value[:1]) == b"^":
                continue
            node += _encode_field(field_no, field_wire, field_value)
        out += _encode_len(1, node)
    return bytes(out)

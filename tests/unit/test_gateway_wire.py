"""Wire scanning agrees with protobuf's own parser, for any request the protocol allows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import wire
from protos import grpc_service_pb2 as pb
from protos import mesh_pb2

_text = st.text(max_size=40)
_shape = st.lists(st.integers(min_value=-1, max_value=1 << 40), max_size=4)
_param = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), _text),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(min_value=0, max_value=(1 << 64) - 1)),
)
_params = st.dictionaries(_text, _param, max_size=3)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(_text), model_version=draw(_text), id=draw(_text))
    for key, value in draw(_params).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(_text), datatype=draw(_text), shape=draw(_shape))
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=5)))
        tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=5)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(_text))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
    return request


@settings(max_examples=300, deadline=None)
@given(infer_requests())
def test_scan_request_equals_protobuf_parse(request: pb.ModelInferRequest) -> None:
    head = wire.scan_request(request.SerializeToString())
    assert head == (request.model_name, request.model_version, request.id.encode())


@settings(max_examples=200, deadline=None)
@given(infer_requests(), infer_requests())
def test_scan_request_last_wins_on_concatenation(first: pb.ModelInferRequest, second: pb.ModelInferRequest) -> None:
    data = first.SerializeToString() + second.SerializeToString()
    merged = pb.ModelInferRequest.FromString(data)
    assert wire.scan_request(data) == (merged.model_name, merged.model_version, merged.id.encode())


@settings(max_examples=200, deadline=None)
@given(
    infer_requests(),
    _text,
    st.integers(min_value=0, max_value=1 << 40),
    _text,
)
def test_appended_fields_set_id_and_parameters_without_touching_tensors(
    request: pb.ModelInferRequest, new_id: str, deadline_ms: int, traceparent: str
) -> None:
    original = request.SerializeToString()
    data = (
        original
        + wire.encode_id(new_id.encode())
        + wire.encode_int64_parameter(wire.parameter_key("meshserve.deadline_ms"), deadline_ms)
        + wire.encode_parameter("traceparent", traceparent)
    )
    merged = pb.ModelInferRequest()
    merged.ParseFromString(data)
    assert merged.id == new_id
    assert merged.parameters["meshserve.deadline_ms"].int64_param == deadline_ms
    assert merged.parameters["traceparent"].string_param == traceparent
    assert list(merged.raw_input_contents) == list(request.raw_input_contents)
    assert list(merged.inputs) == list(request.inputs)


@settings(max_examples=200, deadline=None)
@given(_text, _text, _params, st.lists(st.binary(max_size=100), max_size=3))
def test_scan_response_equals_protobuf_parse(error: str, response_id: str, params: dict, raw: list[bytes]) -> None:
    response = pb.ModelInferResponse(model_name="m", id=response_id, raw_output_contents=raw)
    for key, value in params.items():
        response.parameters[key].CopyFrom(value)
    message = pb.ModelStreamInferResponse(error_message=error, infer_response=response)

    head = wire.scan_response(message.SerializeToString())

    assert head.error_message == error
    assert head.id == response_id.encode()
    assert pb.ModelInferResponse.FromString(head.response) == response
    expected = {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in params.items()}
    assert head.parameters == expected


def test_restoring_the_client_id_overrides_the_hop_id() -> None:
    response = pb.ModelInferResponse(id="gw-17", raw_output_contents=[b"\x00" * 8]).SerializeToString()
    restored = pb.ModelInferResponse.FromString(response + wire.encode_id(b"client-1"))
    assert restored.id == "client-1"
    assert pb.ModelInferResponse.FromString(response + wire.encode_id(b"")).id == ""


@pytest.mark.parametrize(
    "garbage",
    [b"\x0a\x05ab", b"\x80", b"\x0a", b"\x00\x01", b"\x0b", b"\x12\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11],
)
def test_malformed_bytes_raise_wire_error(garbage: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.scan_request(garbage)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    try:
        wire.scan_request(data)
        wire.scan_response(data)
    except wire.WireError:
        pass


def test_stream_response_and_error_encodings_parse() -> None:
    inner = pb.ModelInferResponse(model_name="m", id="c-1", raw_output_contents=[b"\x01\x02"])
    wrapped = pb.ModelStreamInferResponse.FromString(wire.encode_stream_response(inner.SerializeToString()))
    assert wrapped.infer_response == inner and wrapped.error_message == ""
    error = pb.ModelStreamInferResponse.FromString(wire.encode_stream_error("model 'x' is not served", b"c-2"))
    assert error.error_message == "model 'x' is not served" and error.infer_response.id == "c-2"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(infer_requests(), _text, st.integers(min_value=0, max_value=1 << 40)), max_size=5))
def test_batch_envelope_parses_as_infer_batch(entries: list[tuple[pb.ModelInferRequest, str, int]]) -> None:
    # What the gateway writes: per request, header + the client's bytes + the appended hop fields, one join.
    deadline_key = wire.parameter_key("meshserve.deadline_ms")
    parts: list[bytes] = []
    for request, hop_id, deadline_ms in entries:
        original = request.SerializeToString()
        tail = wire.encode_id(hop_id.encode()) + wire.encode_int64_parameter(deadline_key, deadline_ms)
        parts += (wire.batch_entry_header(len(original) + len(tail)), original, tail)
    batch = mesh_pb2.InferBatch.FromString(b"".join(parts))

    assert len(batch.requests) == len(entries)
    for raw, (request, hop_id, deadline_ms) in zip(batch.requests, entries, strict=True):
        merged = pb.ModelInferRequest.FromString(raw)
        assert merged.id == hop_id
        assert merged.parameters["meshserve.deadline_ms"].int64_param == deadline_ms
        assert list(merged.raw_input_contents) == list(request.raw_input_contents)
        assert list(merged.inputs) == list(request.inputs)
        assert merged.model_name == request.model_name


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_text, _text, st.binary(max_size=300)), max_size=5))
def test_batch_entries_split_a_protobuf_encoded_response_batch(replies: list[tuple[str, str, bytes]]) -> None:
    messages = [
        pb.ModelStreamInferResponse(
            error_message=error, infer_response=pb.ModelInferResponse(id=reply_id, raw_output_contents=[raw])
        )
        for error, reply_id, raw in replies
    ]
    data = mesh_pb2.InferBatchResponse(responses=[m.SerializeToString() for m in messages]).SerializeToString()

    heads = [wire.scan_response(data, start, end) for start, end in wire.batch_entries(data)]

    assert [(h.error_message, h.id) for h in heads] == [(e, i.encode()) for e, i, _ in replies]
    for head, message in zip(heads, messages, strict=True):
        assert pb.ModelInferResponse.FromString(head.response) == message.infer_response


def test_batch_header_uses_multi_byte_lengths() -> None:
    big = pb.ModelInferRequest(id="x", raw_input_contents=[b"\x07" * 70_000]).SerializeToString()
    batch = mesh_pb2.InferBatch.FromString(wire.batch_entry_header(len(big)) + big)
    assert batch.requests == [big]


def test_batch_entries_refuse_a_non_bytes_entry() -> None:
    with pytest.raises(wire.WireError):
        wire.batch_entries(b"\x08\x01")


def test_a_cancel_entry_is_an_inferbatch_cancelled_id() -> None:
    message = wire.batch_entry_header(3) + b"abc" + wire.cancel_entry(b"1f") + wire.cancel_entry(b"20")
    parsed = mesh_pb2.InferBatch.FromString(message)
    assert list(parsed.requests) == [b"abc"]
    assert list(parsed.cancelled) == ["1f", "20"]

"""KServe v2 tensors <-> numpy, validation messages, per-model config, provider choice."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import grpc_service_pb2 as pb
from worker.config import ConfigError, ModelConfig, VersionPolicy, load_model_config
from worker.errors import InferenceError
from worker.runtime import choose_providers
from worker.tensors import (
    NUMPY_DTYPES,
    TensorSpec,
    check_shape,
    decode_raw,
    decode_typed,
    deserialize_bytes,
    encode_output,
    serialize_bytes,
    to_onnx_strings,
)

FP32 = TensorSpec("x", "FP32", (-1, 4))


def refused(call, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceError) as caught:
        call(*args)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.message


def test_raw_fp32_decodes_without_copy_semantics_surprises() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(decode_raw(FP32, (2, 4), x.tobytes()), x)


def test_raw_byte_count_mismatch_names_tensor_and_sizes() -> None:
    assert refused(decode_raw, FP32, (2, 4), b"\0" * 31) == "input 'x': expected 32 bytes for shape [2, 4] FP32, got 31"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 5), "input 'x': expected shape [-1, 4], got [2, 5]"),
        ((2,), "input 'x': expected shape [-1, 4], got [2]"),
        ((-2, 4), "input 'x': expected shape [-1, 4], got [-2, 4]"),
    ],
)
def test_shape_mismatch(shape: tuple[int, ...], message: str) -> None:
    assert refused(check_shape, FP32, shape) == message


def test_bytes_framing_round_trips() -> None:
    items = [b"", b"a", "\u00e9".encode(), b"\x00\xff" * 10]
    raw = serialize_bytes(np.array(items, dtype=object))
    assert raw[:4] == struct.pack("<I", 0)
    assert list(deserialize_bytes("s", raw, 4)) == items


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x01\x00", 1, "input 's': BYTES element 0 has a truncated 4-byte length prefix"),
        (struct.pack("<I", 5) + b"abc", 1, "input 's': BYTES element 0 declares 5 bytes, only 3 remain"),
        (struct.pack("<I", 1) + b"a", 2, "input 's': expected 2 BYTES elements for its shape, got 1"),
    ],
)
def test_bad_bytes_framing(raw: bytes, count: int, message: str) -> None:
    assert refused(deserialize_bytes, "s", raw, count) == message


def test_strings_for_onnx_must_be_utf8() -> None:
    assert to_onnx_strings("s", np.array([b"ok"], dtype=object))[0] == "ok"
    assert "UTF-8" in refused(to_onnx_strings, "s", np.array([b"\xff"], dtype=object))


def test_typed_contents() -> None:
    contents = pb.InferTensorContents(int_contents=[1, -2, 3, 4])
    np.testing.assert_array_equal(
        decode_typed(TensorSpec("i", "INT8", (-1, 2)), (2, 2), contents), np.array([[1, -2], [3, 4]], np.int8)
    )
    fp16 = decode_typed(TensorSpec("h", "FP16", (1,)), (1,), pb.InferTensorContents(fp32_contents=[0.5]))
    assert fp16.dtype == np.float16 and fp16[0] == 0.5


def test_typed_contents_count_and_range_are_checked() -> None:
    spec = TensorSpec("i", "INT8", (-1,))
    assert (
        refused(decode_typed, spec, (3,), pb.InferTensorContents(int_contents=[1, 2]))
        == "input 'i': expected 3 values in contents.int_contents for shape [3], got 2"
    )
    assert "does not fit INT8" in refused(decode_typed, spec, (1,), pb.InferTensorContents(int_contents=[300]))


def test_encode_output() -> None:
    assert encode_output(np.array([1.0], np.float32), "FP32") == np.array([1.0], np.float32).tobytes()
    assert encode_output(np.array(["hé"], dtype=object), "BYTES") == struct.pack("<I", 3) + "hé".encode()


@settings(max_examples=200, deadline=None)
@given(
    datatype=st.sampled_from(sorted(NUMPY_DTYPES)),
    shape=st.lists(st.integers(min_value=-3, max_value=6), min_size=0, max_size=4),
    payload=st.binary(max_size=200),
)
def test_fuzz_decode_raw_either_decodes_or_refuses_cleanly(datatype: str, shape: list[int], payload: bytes) -> None:
    spec = TensorSpec("t", datatype, tuple(-1 for _ in shape))
    try:
        check_shape(spec, shape)
        array = decode_raw(spec, shape, payload)
    except InferenceError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'t'" in error.message
        return
    assert array.shape == tuple(shape)


def test_choose_providers_falls_back_to_cpu() -> None:
    requested = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(requested, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(requested, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == requested
    assert choose_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_config_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_model_config(tmp_path)
    assert config == ModelConfig()
    assert config.max_batch_size > 1 and config.max_queue_size > 1


def test_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "max_batch_size: 16\nmax_queue_delay_us: 200\npreferred_batch_sizes: [8, 4]\ninstance_count: 2\n"
        "execution_providers: [CPUExecutionProvider]\nversion_policy: {policy: latest, latest: 2}\n"
    )
    config = load_model_config(tmp_path)
    assert config.preferred_batch_sizes == [4, 8]
    assert config.instance_count == 2
    assert config.version_policy.select([1, 2, 3]) == [2, 3]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_size: [", "cannot read YAML"),
        ("- 1\n", "expected a mapping"),
        ("max_batch_sizes: 4\n", "max_batch_sizes"),
        ("max_batch_size: 4\npreferred_batch_sizes: [8]\n", "preferred_batch_sizes"),
    ],
)
def test_bad_config_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_model_config(tmp_path)
    assert str(tmp_path / "config.yaml") in str(caught.value)
    assert fragment in str(caught.value)


def test_version_policies() -> None:
    assert VersionPolicy().select([3, 1, 2]) == [1, 2, 3]
    assert VersionPolicy(policy="specific", versions=[2, 9]).select([1, 2, 3]) == [2]

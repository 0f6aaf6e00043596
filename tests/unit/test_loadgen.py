"""The load generator behind `meshserve bench`: statistics, settings, random requests, the closed loop."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from meshserve.loadgen import (
    BenchSettings,
    closed_loop,
    concrete_shape,
    grpc_error_code,
    percentile,
    random_request,
    random_tensor,
    summarize,
)
from meshserve.settings import load
from protos import grpc_service_pb2


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarize_reports_milliseconds_throughput_and_errors_by_code() -> None:
    latencies = [0.001, 0.002, 0.003, 0.004]
    result = summarize(8, 2.0, latencies, Counter({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}))
    assert result.concurrency == 8
    assert result.requests == 4
    assert result.throughput == pytest.approx(2.0)
    assert result.p50_ms == pytest.approx(2.0)
    assert result.max_ms == pytest.approx(4.0)
    assert result.mean_ms == pytest.approx(2.5)
    assert result.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert result.error_count == 3


def test_a_level_without_successes_has_no_percentiles_in_json() -> None:
    result = summarize(1, 1.0, [], Counter({"UNAVAILABLE": 5}))
    as_dict = result.to_dict()
    assert as_dict["requests"] == 0
    assert as_dict["p50_ms"] is None and as_dict["max_ms"] is None
    assert as_dict["errors"] == {"UNAVAILABLE": 5}


def test_settings_parse_levels_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(BenchSettings).concurrency == [1, 8, 32]
    assert load(BenchSettings, concurrency="1, 4,16").concurrency == [1, 4, 16]
    monkeypatch.setenv("MESHSERVE_CONCURRENCY", "2,3")
    monkeypatch.setenv("MESHSERVE_URL", "10.0.0.1:9000")
    settings = load(BenchSettings)
    assert settings.concurrency == [2, 3]
    assert settings.url == "10.0.0.1:9000"
    # The flag wins over the variable.
    assert load(BenchSettings, concurrency="5").concurrency == [5]


@pytest.mark.parametrize(
    "flags",
    [{"concurrency": "0"}, {"concurrency": "1,x"}, {"concurrency": ""}, {"duration": 0}, {"warmup": -1}],
)
def test_settings_reject_bad_values(flags: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load(BenchSettings, **flags)


@pytest.mark.parametrize(
    ("datatype", "itemsize"),
    [("FP32", 4), ("FP16", 2), ("FP64", 8), ("INT64", 8), ("INT32", 4), ("INT8", 1), ("UINT8", 1), ("BOOL", 1)],
)
def test_random_tensor_raw_bytes_match_shape_and_datatype(datatype: str, itemsize: int) -> None:
    array, raw = random_tensor(datatype, [2, 3], np.random.default_rng(0))
    assert array.shape == (2, 3)
    assert len(raw) == 6 * itemsize


def test_random_bytes_tensor_uses_length_prefixes() -> None:
    array, raw = random_tensor("BYTES", [3], np.random.default_rng(0))
    offset, decoded = 0, []
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        decoded.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    assert decoded == list(array)


def test_unknown_datatype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="COMPLEX"):
        random_tensor("COMPLEX", [1], np.random.default_rng(0))


def test_concrete_shape_fills_batch_and_other_dynamic_dims() -> None:
    assert concrete_shape([-1, 784], 4, batched=True) == [4, 784]
    assert concrete_shape([-1, 3, -1], 2, batched=True) == [2, 3, 1]
    assert concrete_shape([3, -1], 2, batched=False) == [3, 1]


def test_random_request_matches_metadata() -> None:
    metadata = grpc_service_pb2.ModelMetadataResponse(name="m")
    metadata.inputs.add(name="image", datatype="FP32", shape=[-1, 1, 8, 8])
    metadata.inputs.add(name="ids", datatype="INT64", shape=[-1, 5])
    request = random_request(metadata, batch_size=3, version="2")
    assert request.model_name == "m" and request.model_version == "2"
    assert [list(t.shape) for t in request.inputs] == [[3, 1, 8, 8], [3, 5]]
    assert [len(raw) for raw in request.raw_input_contents] == [3 * 64 * 4, 3 * 5 * 8]


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_grpc_error_code_names_the_status() -> None:
    assert grpc_error_code(_Failure(grpc.StatusCode.RESOURCE_EXHAUSTED)) == "RESOURCE_EXHAUSTED"
    assert grpc_error_code(ValueError("not grpc")) is None


async def test_closed_loop_keeps_exactly_the_requested_requests_in_flight() -> None:
    in_flight, peak = 0, 0

    async def send() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.002)
        in_flight -= 1

    progress: list[tuple[int, float, int]] = []
    result = await closed_loop(send, 6, 0.3, 0.05, on_progress=lambda *args: progress.append(args))
    assert peak == 6
    assert in_flight == 0
    assert result.requests > 6
    assert result.errors == {}
    assert result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    # The last report covers the whole level and carries the final count.
    assert progress[-1] == (6, pytest.approx(0.35), result.requests)


async def test_closed_loop_counts_failures_by_status_code() -> None:
    calls = 0

    async def send() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 3 == 0:
            raise _Failure(grpc.StatusCode.UNAVAILABLE)

    result = await closed_loop(send, 2, 0.2)
    assert result.errors.get("UNAVAILABLE", 0) > 0
    assert result.requests > result.errors["UNAVAILABLE"]


async def test_closed_loop_lets_unexpected_exceptions_through() -> None:
    async def send() -> None:
        raise KeyError("a bug, not a load failure")

    with pytest.raises(KeyError):
        await closed_loop(send, 2, 0.2)

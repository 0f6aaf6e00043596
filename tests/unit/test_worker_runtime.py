"""ONNX Runtime sessions as the worker opens them: native logging stays off stderr."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tests.worker_models import add_model
from worker.config import ModelConfig
from worker.runtime import (
    OnnxModel,
    has_convolutions,
    instance_cores,
    pad_rows,
    padded_batch_size,
    usable_providers,
)


def test_provider_probe_and_model_load_print_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The C++ logger writes coloured plain text straight to fd 2, which breaks one-JSON-object-per-line logs
    (onnxruntime-gpu logs an error and a warning when the CUDA provider fails to load), and its Python layer
    print()s an "EP Error" to stdout when CUDA fails and it falls back (seen on a GPU host with the GPUs hidden)."""
    # CUDA cannot start here: no NVIDIA driver (CI), or, on a GPU host, the GPUs hidden by tests/conftest.py.
    providers = usable_providers()
    assert "CPUExecutionProvider" in providers
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(1.0).SerializeToString())
    model = OnnxModel("m", 1, path, ModelConfig(), providers)
    model.warm_up()
    (out,) = model.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(out, np.ones((1, 4), np.float32))
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


class FakePreload:
    """Stands in for `onnxruntime.preload_dlls`, which prints what it cannot load."""

    def __init__(self, prints: str = "", raises: Exception | None = None) -> None:
        self.calls = 0
        self.prints = prints
        self.raises = raises

    def __call__(self) -> None:
        self.calls += 1
        print(self.prints)
        if self.raises is not None:
            raise self.raises


def with_nvidia_packages(monkeypatch: pytest.MonkeyPatch, installed: bool, preload: FakePreload) -> None:
    import importlib.util

    import worker.runtime as runtime

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtime.ort, "preload_dlls", preload, raising=False)
    monkeypatch.setattr(
        runtime.importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed else None) if name == "nvidia" else real_find_spec(name, *a),
    )


def test_pip_cuda_libraries_are_loaded_only_where_pip_installed_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.runtime import preload_pip_cuda_libraries

    preload = FakePreload()
    with_nvidia_packages(monkeypatch, installed=False, preload=preload)
    preload_pip_cuda_libraries()
    assert preload.calls == 0  # a host with a system CUDA, or with none at all
    with_nvidia_packages(monkeypatch, installed=True, preload=preload)
    preload_pip_cuda_libraries()
    assert preload.calls == 1


def test_what_the_cuda_preload_prints_goes_to_the_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from worker.runtime import preload_pip_cuda_libraries

    with_nvidia_packages(monkeypatch, True, FakePreload("Failed to load libcublasLt.so.13: not found"))
    preload_pip_cuda_libraries()
    with_nvidia_packages(monkeypatch, True, FakePreload(raises=OSError("bad ELF header")))
    preload_pip_cuda_libraries()  # must not raise: the worker goes on, on CPU
    assert capsys.readouterr().out == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("libcublasLt.so.13: not found" in w for w in warnings)
    assert any("bad ELF header" in w for w in warnings)


def test_an_ep_error_printed_by_onnx_runtime_goes_to_the_log_without_its_frame(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """What onnxruntime's Python layer prints when CUDA fails and it falls back (seen with the GPUs hidden)."""
    from worker.runtime import printed_to_log

    caplog.set_level(logging.INFO, logger="worker.runtime")
    with printed_to_log(logging.INFO, "probing CUDAExecutionProvider"):
        print("*************** EP Error ***************")
        print("EP Error CUDA failure 100: no CUDA-capable device is detected")
        print("****************************************")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [
        "probing CUDAExecutionProvider: EP Error CUDA failure 100: no CUDA-capable device is detected"
    ]


def test_without_the_nvidia_driver_cuda_is_neither_loaded_nor_probed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The CUDA image on a host without a GPU: no ~1.5 GB of CUDA libraries loaded for nothing."""
    import worker.runtime as runtime

    preload = FakePreload()
    with_nvidia_packages(monkeypatch, installed=True, preload=preload)
    monkeypatch.setattr(
        runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_LIBRARY", "libnot-a-driver.so.1")
    caplog.set_level(logging.INFO, logger="worker.runtime")
    assert runtime.usable_providers() == ["CPUExecutionProvider"]
    assert preload.calls == 0
    assert any("no NVIDIA driver (libnot-a-driver.so.1)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("padding", "provider", "convolutions", "batchable", "max_batch_size", "rows"),
    [
        ("auto", "CUDAExecutionProvider", True, True, 32, 32),
        ("auto", "CUDAExecutionProvider", False, True, 32, 0),  # no cuDNN plan to keep: padding only costs
        ("auto", "CPUExecutionProvider", True, True, 32, 0),
        ("auto", "CPUExecutionProvider", True, False, 32, 0),
        ("always", "CPUExecutionProvider", False, True, 16, 16),
        ("never", "CUDAExecutionProvider", True, True, 32, 0),
        ("always", "CPUExecutionProvider", True, False, 32, 0),  # a model that is not batched keeps its shape
        ("always", "CUDAExecutionProvider", True, True, 1, 0),  # one row is one shape already
    ],
)
def test_batches_are_padded_for_convolutions_on_cuda_or_when_asked(
    padding: str, provider: str, convolutions: bool, batchable: bool, max_batch_size: int, rows: int
) -> None:
    config = ModelConfig(batch_padding=padding, max_batch_size=max_batch_size)
    assert padded_batch_size(config, provider, batchable, lambda: convolutions) == rows


def test_convolutions_are_found_in_the_graph(demo_repository: Path) -> None:
    assert has_convolutions(demo_repository / "cnn" / "1" / "model.onnx")
    assert not has_convolutions(demo_repository / "mlp784" / "1" / "model.onnx")


class ShapeRecorder:
    """Stands in for a model's session and notes the shapes ONNX Runtime is given."""

    def __init__(self, session: object) -> None:
        self.session = session
        self.shapes: list[tuple[int, ...]] = []

    def run(self, names: list[str], feeds: dict[str, np.ndarray], options: object = None) -> list[np.ndarray]:
        self.shapes.extend(array.shape for array in feeds.values())
        return self.session.run(names, feeds, options)  # type: ignore[attr-defined]


def test_a_padded_model_runs_every_batch_at_one_shape_and_answers_only_the_real_rows(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(1.0).SerializeToString())
    model = OnnxModel("m", 1, path, ModelConfig(max_batch_size=8, batch_padding="always"), ["CPUExecutionProvider"])
    model.warm_up()
    recorder = ShapeRecorder(model.session)
    model.session = recorder  # type: ignore[assignment]
    for rows in (1, 3, 8):
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        (y,) = model.run({"x": x})
        np.testing.assert_array_equal(y, x + 1)  # its own rows, none of the padding
    assert recorder.shapes == [(8, 4)] * 3


def test_padding_repeats_the_last_row_of_any_datatype() -> None:
    strings = np.array([[b"a"], [b"bc"]], dtype=object)
    np.testing.assert_array_equal(pad_rows(strings, 4), np.array([[b"a"], [b"bc"], [b"bc"], [b"bc"]], dtype=object))
    ints = np.array([[7, 8]], dtype=np.int64)
    np.testing.assert_array_equal(pad_rows(ints, 3), np.array([[7, 8]] * 3, dtype=np.int64))


def test_instances_get_disjoint_cores_while_they_fit_and_share_evenly_after() -> None:
    assert [instance_cores(i, 1, [0, 1]) for i in range(4)] == [{0}, {1}, {0}, {1}]
    assert [instance_cores(i, 2, [0, 1, 2, 3]) for i in range(2)] == [{0, 1}, {2, 3}]
    assert instance_cores(0, 4, [4, 6]) == {4, 6}  # more threads than cores: all of them
    assert instance_cores(1, 1, [3, 5, 7]) == {5}  # the process's own cores, not 0..n


@pytest.mark.parametrize(
    ("config", "pinned"),
    [
        ({"instance_count": 2, "intra_op_threads": 4, "pin_instances": True}, True),  # 2 x 4 threads: all 8 cores
        ({"instance_count": 4, "intra_op_threads": 2, "pin_instances": True}, True),
        ({"instance_count": 2, "intra_op_threads": 4}, False),  # off unless asked for
        ({"instance_count": 1, "intra_op_threads": 8, "pin_instances": True}, False),  # the kernel balances one
        ({"instance_count": 2, "intra_op_threads": 1, "pin_instances": True}, False),  # 2 of 8 cores: crowded
    ],
)
def test_only_several_cpu_instances_that_cover_the_cores_are_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, object], pinned: bool
) -> None:
    monkeypatch.setattr("worker.runtime.usable_cores", lambda: 8)
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(1.0).SerializeToString())
    model = OnnxModel("m", 1, path, ModelConfig(**config), ["CPUExecutionProvider"])
    model.warm_up()
    assert model.runs_inline and not model.pinned  # a microsecond model runs on the loop's thread
    model.runs_inline = False
    assert model.pinned is (pinned and hasattr(os, "sched_setaffinity"))

"""Tiny ONNX models for the worker's tests: one Identity model per datatype, an
`add` model whose versions add different constants, a model with a static
shape (not batched), a model whose run fails on some inputs, a slow chain of
matrix products, and a broken file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATATYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def identity_model(datatype: str) -> onnx.ModelProto:
    """`x` [-1, 3] -> `y`, same datatype."""
    onnx_type = DATATYPES[datatype]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", onnx_type, ["batch", 3])],
        [helper.make_tensor_value_info("y", onnx_type, ["batch", 3])],
    )


def add_model(constant: float) -> onnx.ModelProto:
    """`x` FP32 [-1, 4] -> `y` = x + constant."""
    return _model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([constant], dtype=np.float32), "c")],
    )


def slow_model(width: int = 512, depth: int = 64) -> onnx.ModelProto:
    """`input` FP32 [-1, width] -> `output` = input, through `depth` products with the identity matrix:
    depth x width^2 multiply-adds per row, so a big batch runs for seconds, one operator at a time."""
    nodes = [
        helper.make_node(
            "MatMul", ["input" if i == 0 else f"h{i - 1}", "eye"], [f"h{i}" if i < depth - 1 else "output"]
        )
        for i in range(depth)
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.eye(width, dtype=np.float32), "eye")],
    )


def static_model() -> onnx.ModelProto:
    """`x` FP32 [2, 3] (no batch dim) -> `y` = 2x, and `s` = sum(x) as a second output."""
    return _model(
        [
            helper.make_node("Add", ["x", "x"], ["y"]),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
    )


def gather_model() -> onnx.ModelProto:
    """`idx` INT64 [-1, 1] -> `y` = table[idx]: an index outside 0..9 makes the run fail."""
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table")],
    )


def save(model: onnx.ModelProto, root: Path, name: str, version: int = 1, config: str | None = None) -> Path:
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    if config is not None:
        (root / name / "config.yaml").write_text(config)
    return path


def write_test_repository(root: Path, demo: Path | None = None) -> Path:
    """The demo models (copied from `demo`) plus every test model above, one broken model file and one
    model with an invalid config.yaml."""
    if demo is not None:
        shutil.copytree(demo, root, dirs_exist_ok=True)
    for datatype in DATATYPES:
        save(identity_model(datatype), root, f"identity_{datatype.lower()}")
    save(add_model(1.0), root, "add", 1)
    save(add_model(2.0), root, "add", 2)
    save(static_model(), root, "static")
    save(gather_model(), root, "gather")
    save(add_model(0.0), root, "badconfig", config="max_batch_size: -1\n")
    broken = root / "broken" / "1"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return root

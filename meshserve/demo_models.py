"""The demo model repository: small, deterministic, built offline in seconds.

- `digits`: a 64-128-10 MLP classifier on scikit-learn's bundled handwritten
  digits (8x8 images, 64 features), converted with skl2onnx (MatMul weights,
  so `meshserve model quantize` has something to quantize); FP32 [-1, 64] in,
  `label` and `probabilities` out.
- `mlp784`: a 784-128-10 MLP (ReLU, softmax) with seeded weights: so little
  compute that transport dominates.
- `cnn`: five 3x3 convolutions on a 1x64x64 image (~450M multiply-adds):
  several milliseconds per sample on one CPU core, so the batcher and ONNX
  Runtime dominate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # what every onnxruntime >= 1.16 reads
SEED = 20240611


@dataclass(frozen=True)
class DemoReport:
    digits_accuracy: float


def _save(model: onnx.ModelProto, root: Path, name: str, version: int = 1, config: str | None = None) -> None:
    model.ir_version = IR_VERSION
    # skl2onnx lists opsets in set order, which varies run to run; sort them for identical bytes.
    opsets = sorted(model.opset_import, key=lambda opset: opset.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    onnx.checker.check_model(model)
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    if config is not None:
        (root / name / "config.yaml").write_text(config)


def _graph_model(
    nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray], name: str
) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(array, key) for key, array in weights.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshserve")


def build_digits() -> tuple[onnx.ModelProto, float]:
    """An MLP digits classifier and its held-out accuracy."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features, labels = load_digits(return_X_y=True)
    features = features.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=0, stratify=labels
    )
    classifier = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0))
    # One BLAS thread: the same weights on every machine, and no thread spinning
    # on a loaded host (which made the fit 20x slower).
    with threadpool_limits(1):
        classifier.fit(x_train, y_train)
    accuracy = float(classifier.score(x_test, y_test))
    onnx_model = to_onnx(
        classifier,
        x_train[:1],
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        options={id(classifier.steps[-1][1]): {"zipmap": False}},
    )
    # skl2onnx names the input "X"; give it a name a user recognises.
    return _rename_input(onnx_model, "input"), accuracy


def _rename_input(model: onnx.ModelProto, new: str) -> onnx.ModelProto:
    old = model.graph.input[0].name
    model.graph.input[0].name = new
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
    return model


def build_mlp784(seed: int = SEED) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = {
        "w1": (rng.standard_normal((784, 128)) * np.sqrt(2 / 784)).astype(np.float32),
        "b1": (rng.standard_normal(128) * 0.01).astype(np.float32),
        "w2": (rng.standard_normal((128, 10)) * np.sqrt(2 / 128)).astype(np.float32),
        "b2": (rng.standard_normal(10) * 0.01).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        weights,
        "mlp784",
    )


def build_cnn(seed: int = SEED) -> onnx.ModelProto:
    """1x64x64 -> conv 32 -> conv 64 -> pool -> 3x conv 128 -> global pool -> 10 classes (~450M MACs)."""
    rng = np.random.default_rng(seed + 1)
    layers = [(1, 32), (32, 64), "pool", (64, 128), (128, 128), (128, 128)]
    weights: dict[str, np.ndarray] = {}
    nodes = []
    current = "input"
    for index, layer in enumerate(layers):
        if layer == "pool":
            nodes.append(helper.make_node("MaxPool", [current], [f"p{index}"], kernel_shape=[2, 2], strides=[2, 2]))
            current = f"p{index}"
            continue
        cin, cout = layer
        weights[f"w{index}"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        weights[f"b{index}"] = np.zeros(cout, dtype=np.float32)
        nodes.append(helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        current = f"r{index}"
    weights["fcw"] = (rng.standard_normal((128, 10)) * 0.1).astype(np.float32)
    weights["fcb"] = np.zeros(10, dtype=np.float32)
    weights["flat"] = np.array([0, -1], dtype=np.int64)
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
        helper.make_node("Gemm", ["features", "fcw", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        weights,
        "cnn",
    )


DIGITS_CONFIG = """\
# Sub-millisecond model: no fixed wait. A lone request runs at once; under load a batch
# waits (up to 2 ms) for the requests the worker is still receiving, and they run together.
max_batch_size: 64
max_queue_delay_us: 0
max_busy_wait_us: 2000
max_queue_size: 1024
"""

CNN_CONFIG = """\
# Compute-bound: a short wait lets batches fill, which pays off at several ms per sample.
# Two instances run batches side by side, the usable cores split between them (automatic
# intra-op threads): cheaper per sample than one batch split over every core.
max_batch_size: 32
max_queue_delay_us: 500
preferred_batch_sizes: [8, 16, 32]
instance_count: 2
"""


def write_demo_repository(root: Path) -> None:
    """Writes digits, mlp784 and cnn (version 1 each) under `root`, deterministically."""
    write_demo_repository_report(root)


def write_demo_repository_report(root: Path) -> DemoReport:
    root.mkdir(parents=True, exist_ok=True)
    digits, accuracy = build_digits()
    _save(digits, root, "digits", config=DIGITS_CONFIG)
    _save(build_mlp784(), root, "mlp784")
    _save(build_cnn(), root, "cnn", config=CNN_CONFIG)
    return DemoReport(digits_accuracy=accuracy)

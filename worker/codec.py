"""ModelInferRequest -> validated numpy inputs, and batch results -> ModelInferResponse."""

from __future__ import annotations

import numpy as np

from protos import grpc_service_pb2 as pb
from worker.batcher import JobResult
from worker.errors import invalid
from worker.runtime import OnnxModel
from worker.tensors import check_shape, decode_raw, decode_typed, to_onnx_strings


def _names(specs: list) -> str:
    return "[" + ", ".join(f"'{spec.name}'" for spec in specs) + "]"


def decode_inputs(model: OnnxModel, request: pb.ModelInferRequest) -> tuple[list[np.ndarray], int]:
    """The request's inputs in the model's input order, validated, and its batch rows."""
    specs = model.inputs
    by_name = {spec.name: index for index, spec in enumerate(specs)}
    tensors = request.inputs
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise invalid(f"got {len(raw)} raw_input_contents for {len(tensors)} inputs; send one per input, in order")
    arrays: list[np.ndarray | None] = [None] * len(specs)
    for position, tensor in enumerate(tensors):
        index = by_name.get(tensor.name)
        if index is None:
            raise invalid(f"unknown input '{tensor.name}'; model '{model.name}' expects inputs {_names(specs)}")
        if arrays[index] is not None:
            raise invalid(f"input '{tensor.name}' appears twice")
        spec = specs[index]
        if tensor.datatype != spec.datatype:
            raise invalid(f"input '{spec.name}': expected datatype {spec.datatype}, got {tensor.datatype or '(none)'}")
        shape = tuple(tensor.shape)
        check_shape(spec, shape)
        array = decode_raw(spec, shape, raw[position]) if raw else decode_typed(spec, shape, tensor.contents)
        if spec.datatype == "BYTES":
            array = to_onnx_strings(spec.name, array)
        arrays[index] = array
    missing = [spec for spec, array in zip(specs, arrays, strict=True) if array is None]
    if missing:
        raise invalid(f"missing input {_names(missing)}; model '{model.name}' expects inputs {_names(specs)}")
    if not model.batchable:
        return arrays, 1  # type: ignore[return-value]
    rows = arrays[0].shape[0]  # type: ignore[union-attr]
    for spec, array in zip(specs, arrays, strict=True):
        if array.shape[0] != rows:  # type: ignore[union-attr]
            raise invalid(
                f"input '{spec.name}': batch size {array.shape[0]} differs from input '{specs[0].name}' ({rows})"  # type: ignore[union-attr]
            )
    if rows < 1 or rows > model.max_batch_size:
        raise invalid(
            f"input '{specs[0].name}': batch size {rows} is outside 1..{model.max_batch_size}, "
            f"the max batch size of model '{model.name}'"
        )
    return arrays, rows  # type: ignore[return-value]


def requested_outputs(model: OnnxModel, request: pb.ModelInferRequest) -> list[int]:
    """Indices of the outputs the request asks for; all outputs when it names none."""
    if not request.outputs:
        return list(range(len(model.outputs)))
    by_name = {spec.name: index for index, spec in enumerate(model.outputs)}
    indices = []
    for output in request.outputs:
        index = by_name.get(output.name)
        if index is None:
            raise invalid(f"unknown output '{output.name}'; model '{model.name}' has outputs {_names(model.outputs)}")
        indices.append(index)
    return indices


def encode_response(
    model: OnnxModel, request_id: str, output_indices: list[int], result: JobResult
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request_id)
    for index, array in zip(output_indices, result.outputs, strict=True):
        spec = model.outputs[index]
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
    response.raw_output_contents.extend(result.raw)
    response.parameters["meshserve.batch_size"].int64_param = result.batch_size
    return response

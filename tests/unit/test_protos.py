"""The committed generated modules are exactly what `make protos` writes, and
the inference proto stays wire-compatible with tritonclient's copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import REPO_ROOT, generate


def test_committed_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    for fresh in generate(tmp_path):
        committed = REPO_ROOT / "protos" / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make protos`"


def _fields(descriptor) -> dict[str, tuple[int, int, bool]]:  # type: ignore[no-untyped-def]
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def test_inference_messages_are_wire_compatible_with_tritonclient() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    from protos import grpc_service_pb2

    for name, ours in grpc_service_pb2.DESCRIPTOR.message_types_by_name.items():
        theirs = triton.DESCRIPTOR.message_types_by_name[name]
        assert _fields(ours) == _fields(theirs), name
        for nested_name, nested in ours.nested_types_by_name.items():
            if nested.GetOptions().map_entry:
                continue
            assert _fields(nested) == _fields(theirs.nested_types_by_name[nested_name]), (name, nested_name)
    ours_service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        theirs_method = theirs_service.methods_by_name[method.name]
        assert method.input_type.full_name == theirs_method.input_type.full_name
        assert method.output_type.full_name == theirs_method.output_type.full_name


def test_our_stubs_load_beside_tritonclient() -> None:
    import tritonclient.grpc  # noqa: F401  registers inference.* in the default pool

    from protos import grpc_service_pb2

    request = grpc_service_pb2.ModelInferRequest(model_name="m", id="1")
    assert grpc_service_pb2.ModelInferRequest.FromString(request.SerializeToString()).id == "1"

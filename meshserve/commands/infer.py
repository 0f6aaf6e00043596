"""`meshserve infer`: one request through the gateway (or a worker), outputs printed."""

from __future__ import annotations

from pathlib import Path

import typer

# KServe datatypes the command can build inputs for.
NUMPY_DTYPES = {
    "FP32": "float32", "FP64": "float64", "FP16": "float16", "INT64": "int64", "INT32": "int32", "INT16": "int16",
    "INT8": "int8", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "BOOL": "bool",
}  # fmt: skip


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command(name="infer")(infer)


def infer(
    model: str = typer.Argument(..., help="Model name"),
    random: bool = typer.Option(False, "--random", help="Random input of the model's shape (batch 1)"),
    input: Path = typer.Option(None, "--input", help="Input tensor as a .npy file"),
    url: str = typer.Option("127.0.0.1:8001", envvar="MESHSERVE_URL", help="Gateway (or worker) HOST:PORT"),
    api_key: str = typer.Option(None, envvar="MESHSERVE_API_KEY", help="Sent as 'authorization: Bearer KEY'"),
    version: str = typer.Option("", help="Model version; empty: what the routes choose"),
    timeout: float = typer.Option(10.0, help="Deadline in seconds"),
    tls_ca: Path = typer.Option(None, help="CA certificate (PEM) of a gateway serving TLS; plaintext when omitted"),
) -> None:
    """Sends one inference request built from the model's metadata and prints the outputs."""
    import grpc
    import numpy as np

    from meshserve.commands import bearer, client_channel
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    if random == (input is not None):
        typer.echo("give exactly one of --random or --input FILE.npy", err=True)
        raise typer.Exit(2)
    metadata = bearer(api_key)
    with client_channel(url, tls_ca) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version), metadata=metadata, timeout=timeout
            )
            if len(meta.inputs) != 1 and input is not None:
                raise ValueError(f"{model} has {len(meta.inputs)} inputs; --input gives one")
            request = pb.ModelInferRequest(model_name=model, model_version=version)
            for tensor in meta.inputs:
                array = np.load(input) if input is not None else _random(tensor.datatype, list(tensor.shape))
                dtype = NUMPY_DTYPES.get(tensor.datatype)
                if dtype is None:
                    raise ValueError(
                        f"input {tensor.name} has datatype {tensor.datatype}, which this command cannot build"
                    )
                array = np.ascontiguousarray(array, dtype=dtype)
                request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(array.shape))
                request.raw_input_contents.append(array.tobytes())
            response = stub.ModelInfer(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            typer.echo(f"{exc.code().name}: {exc.details()}", err=True)  # type: ignore[attr-defined]
            raise typer.Exit(1) from None
        except (ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"model {response.model_name} version {response.model_version}")
    np.set_printoptions(precision=4, suppress=True, threshold=50)
    for index, output in enumerate(response.outputs):
        dtype = NUMPY_DTYPES.get(output.datatype)
        if dtype is None or index >= len(response.raw_output_contents):
            typer.echo(f"{output.name} ({output.datatype}, shape {list(output.shape)})")
            continue
        values = np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(output.shape))
        typer.echo(f"{output.name} {output.datatype} {list(output.shape)}:\n{values}")
        if values.ndim == 2 and values.shape[1] > 1 and values.dtype.kind == "f":
            typer.echo(f"top class: {', '.join(str(int(c)) for c in values.argmax(axis=1))}")


def _random(datatype: str, shape: list[int]):  # type: ignore[no-untyped-def]
    import numpy as np

    shape = [1 if dim < 0 else dim for dim in shape]
    generator = np.random.default_rng()
    if datatype in ("FP32", "FP64", "FP16"):
        return generator.random(shape)
    if datatype == "BOOL":
        return generator.integers(0, 2, shape).astype(bool)
    return generator.integers(0, 10, shape)

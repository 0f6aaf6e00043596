"""`meshserve model ...`: model lifecycle tooling.

convert -> optimize / quantize -> validate -> publish -> (package / unpack to
move it) -> rollout / rollback (added by `meshserve.commands.routes`). Each
command prints a rich table, shows progress for long work, and exits 1 with a
message that says what to do when a step fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from meshserve.modeltools.validate import ValidationReport

model_app = typer.Typer(
    help="Model lifecycle: convert, optimize, quantize, validate, publish, package, unpack, rollout, rollback.",
    no_args_is_help=True,
)

T = TypeVar("T")
REPOSITORY_ENV = "MESHSERVE_MODEL_REPOSITORY"


def register(app: typer.Typer) -> None:
    """Adds the `model` command group to the CLI."""
    app.add_typer(model_app, name="model")


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


@contextmanager
def _tool_errors() -> Iterator[None]:
    """A ModelToolError becomes its message on stderr and exit status 1, never a traceback."""
    from meshserve.modeltools.errors import ModelToolError

    try:
        yield
    except ModelToolError as exc:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


def _with_spinner(console: Console, what: str, step: Callable[[], T]) -> T:
    with console.status(what):
        return step()


def _load_sample(spec: str | None, input_name: str | None = None) -> Any:
    if spec is None:
        return None
    from meshserve.modeltools import datasets

    return datasets.load(spec, input_name).inputs


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    from meshserve.modeltools.errors import ModelToolError

    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ModelToolError(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,28,28") from None
    if not shape or any(dim < 1 for dim in shape):
        raise ModelToolError(f"--input-shape {text!r} must be positive integers, e.g. 1,28,28")
    return shape


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return f"{nbytes:.1f} GiB"


def _key_values(title: str, rows: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


@model_app.command()
def convert(
    source: Path = typer.Argument(
        ...,
        help="Trained model: .joblib/.pkl (scikit-learn), .pt/.pth (PyTorch), .keras/.h5 or SavedModel dir.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the ONNX model."),
    framework: str | None = typer.Option(None, help="sklearn, pytorch or tensorflow; guessed from the file suffix."),
    sample: str | None = typer.Option(
        None, help="Sample inputs (.npy/.npz with a batch axis, or 'digits') to compare on."
    ),
    input_shape: str | None = typer.Option(
        None, help="One sample's shape, e.g. 64 or 1,28,28, when there is no --sample."
    ),
    input_name: str = typer.Option("input", help="Name of the ONNX model's input."),
    opset: int = typer.Option(17, help="ONNX opset to target."),
    tolerance: float = typer.Option(1e-3, help="Largest absolute output difference accepted against the source model."),
) -> None:
    """Converts a trained model to ONNX and checks it against the source on sample inputs."""
    from meshserve.modeltools.convert import convert as run

    console = _console()
    with _tool_errors():
        inputs = _load_sample(sample)
        shape = _shape(input_shape)
        report = _with_spinner(
            console,
            f"converting {source.name} ...",
            lambda: run(
                source,
                output,
                framework=framework,
                sample=inputs,
                input_shape=shape,
                input_name=input_name,
                opset=opset,
                tolerance=tolerance,
            ),
        )
    console.print(
        _key_values(
            f"converted {report.framework} model",
            [
                ("output", str(report.output)),
                ("opset", str(report.opset)),
                ("inputs", ", ".join(report.inputs)),
                ("outputs", ", ".join(report.outputs)),
                ("compared on", f"{report.samples} samples"),
                ("max abs diff", f"{report.max_abs_diff:.3g} (tolerance {report.tolerance:g})"),
            ],
        )
    )


@model_app.command()
def optimize(
    source: Path = typer.Argument(..., help="ONNX model to optimize."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the optimized model."),
    level: str = typer.Option("extended", help="basic, extended or all ('all' is tuned to this machine's CPU)."),
    sample: str | None = typer.Option(None, help="Inputs (.npy/.npz or 'digits') to compare on; random otherwise."),
    tolerance: float = typer.Option(1e-4, help="Largest absolute output difference accepted."),
) -> None:
    """ONNX Runtime offline graph optimization, checked with onnx.checker and compared with the original."""
    from meshserve.modeltools.optimize import optimize as run

    console = _console()
    with _tool_errors():
        inputs = _load_sample(sample)
        report = _with_spinner(
            console,
            f"optimizing {source.name} ({level}) ...",
            lambda: run(source, output, level=level, sample=inputs, tolerance=tolerance),
        )
    console.print(
        _key_values(
            f"optimized ({report.level})",
            [
                ("output", str(report.output)),
                ("nodes", f"{report.nodes_before} -> {report.nodes_after}"),
                ("size", f"{_size(report.size_before)} -> {_size(report.size_after)}"),
                ("max abs diff", f"{report.max_abs_diff:.3g} (tolerance {report.tolerance:g})"),
            ],
        )
    )


@model_app.command()
def quantize(
    source: Path = typer.Argument(..., help="FP32 ONNX model."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the quantized model."),
    mode: str = typer.Option("dynamic", help="dynamic (int8 weights), static (int8 QDQ, needs calibration) or fp16."),
    calibration: str | None = typer.Option(None, help="Calibration inputs for static: .npy/.npz, or 'digits'."),
    method: str = typer.Option("minmax", help="Calibration method for static: minmax, entropy or percentile."),
    calibration_samples: int = typer.Option(512, min=1, help="Use at most this many calibration samples."),
    per_channel: bool = typer.Option(False, help="Quantize weights per output channel."),
    keep_io_types: bool = typer.Option(True, help="fp16: keep float32 inputs and outputs."),
) -> None:
    """Quantizes a model with ONNX Runtime; run `meshserve model validate` on the result before publishing it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from meshserve.modeltools.quantize import quantize as run

    console = _console()
    with _tool_errors():
        data = _load_sample(calibration)
        if data is not None:
            data = data[:calibration_samples]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task(f"quantizing {source.name} ({mode})", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description="calibrating")

            report = run(
                source,
                output,
                mode=mode,
                calibration=data,
                method=method,
                per_channel=per_channel,
                keep_io_types=keep_io_types,
                progress=advance,
            )
            bar.update(task, description="done", completed=1, total=1)
    rows = [("output", str(report.output)), ("mode", report.mode)]
    if report.method:
        rows.append(("calibration", f"{report.method} on {report.calibration_samples} samples"))
    ratio = report.size_after / report.size_before if report.size_before else 0.0
    rows.append(("size", f"{_size(report.size_before)} -> {_size(report.size_after)} ({ratio:.0%})"))
    console.print(_key_values("quantized", rows))


def _validation_table(report: ValidationReport) -> Any:
    from rich.table import Table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    ref, cand = report.reference, report.candidate
    table = Table(title=f"validation on {report.samples} samples", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("reference", justify="right")
    table.add_column("candidate", justify="right")
    table.add_column("change", justify="right")
    table.add_row("file", ref.path.name, cand.path.name, "")
    size_change = f"{cand.size_bytes / ref.size_bytes:.0%}" if ref.size_bytes else ""
    table.add_row("size", _size(ref.size_bytes), _size(cand.size_bytes), size_change)
    if ref.accuracy is not None and cand.accuracy is not None:
        table.add_row(
            "accuracy", pct(ref.accuracy), pct(cand.accuracy), f"{(cand.accuracy - ref.accuracy) * 100:+.2f} pt"
        )
    table.add_row("top-1 agreement", "", pct(report.top1_agreement), "")
    table.add_row("max abs diff", "", f"{report.max_abs_diff:.3g}", "")
    table.add_row("mean abs diff", "", f"{report.mean_abs_diff:.3g}", "")
    for batch, ref_ms in ref.latency_ms.items():
        cand_ms = cand.latency_ms.get(batch)
        change = f"{cand_ms / ref_ms:.2f}x" if ref_ms and cand_ms else ""
        table.add_row(f"latency batch {batch}", ms(ref_ms), ms(cand_ms), change)
    return table


@model_app.command()
def validate(
    candidate: Path = typer.Argument(..., help="The new model (e.g. quantized)."),
    reference: Path = typer.Option(..., "--reference", help="The model it must match (e.g. the FP32 original)."),
    data: str = typer.Option(..., "--data", help="Validation data: .npz with x (and y labels), .npy, or 'digits'."),
    max_accuracy_drop: float = typer.Option(0.01, help="Fail when accuracy drops more than this (0.01 = 1 point)."),
    latency_runs: int = typer.Option(20, min=1, help="Timed runs per batch size."),
) -> None:
    """Compares a candidate with its reference; exits 1 when accuracy drops more than --max-accuracy-drop."""
    from meshserve.modeltools import datasets
    from meshserve.modeltools.validate import validate as run

    console = _console()
    with _tool_errors():
        dataset = datasets.load(data)
        report = _with_spinner(
            console,
            f"validating {candidate.name} against {reference.name} ...",
            lambda: run(candidate, reference, dataset, max_accuracy_drop=max_accuracy_drop, latency_runs=latency_runs),
        )
    console.print(_validation_table(report))
    basis = "accuracy against the labels" if report.reference.accuracy is not None else "agreement with the reference"
    if report.accuracy_drop is None:
        console.print("[yellow]no class scores to compare; only the differences above were checked[/]")
    elif report.passed:
        console.print(
            f"[green]PASS[/]: {basis} dropped {report.accuracy_drop * 100:.2f} points "
            f"(limit {report.max_accuracy_drop * 100:.2f})"
        )
    else:
        console.print(
            f"[bold red]FAIL[/]: {basis} dropped {report.accuracy_drop * 100:.2f} points, over the limit of "
            f"{report.max_accuracy_drop * 100:.2f}; do not publish this model (for static quantization, check the "
            "calibration data is representative, or try another --method)"
        )
        raise typer.Exit(1)


@model_app.command()
def publish(
    model_file: Path = typer.Argument(..., help="ONNX model to publish."),
    repository: Path = typer.Option(..., "--repository", envvar=REPOSITORY_ENV, help="Model repository root."),
    name: str = typer.Option(..., "--name", help="Model name (its directory in the repository)."),
    config: Path | None = typer.Option(None, help="config.yaml for the model (replaces the current one)."),
) -> None:
    """Publishes a model as the next version, atomically, with a manifest of SHA-256 sums."""
    from meshserve.modeltools.publish import publish as run

    console = _console()
    with _tool_errors():
        report = _with_spinner(
            console, f"publishing {model_file.name} ...", lambda: run(model_file, repository, name, config)
        )
    rows = [("model", report.name), ("version", str(report.version)), ("path", str(report.path))]
    rows += [(f"sha256 {file}", digest) for file, digest in report.manifest.files.items()]
    if report.config_written:
        rows.append(("config", "replaced"))
    console.print(_key_values("published", rows))


@model_app.command()
def package(
    name: str = typer.Argument(..., help="Model to package."),
    repository: Path = typer.Option(..., "--repository", envvar=REPOSITORY_ENV, help="Model repository root."),
    output: Path = typer.Option(..., "--output", "-o", help="Archive to write (.tar.gz)."),
    version: list[int] = typer.Option([], "--version", help="Version(s) to include (repeatable); all by default."),
) -> None:
    """Packs a model's versions, config and manifests into one tar.gz to move between hosts."""
    from meshserve.modeltools.package import package as run

    console = _console()
    with _tool_errors():
        report = _with_spinner(console, f"packaging {name} ...", lambda: run(name, repository, output, version or None))
    console.print(
        _key_values(
            "packaged",
            [
                ("archive", str(report.output)),
                ("versions", ", ".join(map(str, report.versions))),
                ("size", _size(report.size_bytes)),
            ],
        )
    )


@model_app.command()
def unpack(
    archive: Path = typer.Argument(..., help="Archive made by `meshserve model package`."),
    repository: Path = typer.Option(..., "--repository", envvar=REPOSITORY_ENV, help="Model repository root."),
    renumber: bool = typer.Option(False, help="Add the archive's versions after the newest one instead of as is."),
) -> None:
    """Verifies an archive's manifests and installs its versions atomically into a repository."""
    from meshserve.modeltools.package import unpack as run

    console = _console()
    with _tool_errors():
        report = _with_spinner(console, f"unpacking {archive.name} ...", lambda: run(archive, repository, renumber))
    rows = [("model", report.name)]
    rows += [(f"version {src}", f"installed as {dst}") for src, dst in report.installed.items()]
    rows += [(f"version {src}", "already present, identical") for src in report.skipped]
    rows.append(("config", report.config))
    console.print(_key_values("unpacked", rows))

"""`meshserve bench MODEL`: closed-loop load at several concurrency levels, with a progress bar."""

from __future__ import annotations

import math
from pathlib import Path

import typer


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def bench(
    model: str = typer.Argument(..., help="Model name to call."),
    url: str | None = typer.Option(None, "--url", help="Gateway or worker HOST:PORT [default: 127.0.0.1:8001]."),
    api_key: str | None = typer.Option(None, "--api-key", help="Sent as `authorization: Bearer KEY`."),
    model_version: str | None = typer.Option(None, "--model-version", help="Model version; empty = the routed one."),
    concurrency: str | None = typer.Option(None, "--concurrency", help="Comma-separated levels [default: 1,8,32]."),
    duration: float | None = typer.Option(None, "--duration", help="Measured seconds per level [default: 10]."),
    warmup: float | None = typer.Option(None, "--warmup", help="Unmeasured seconds before each level [default: 1]."),
    timeout: float | None = typer.Option(None, "--timeout", help="Per-request deadline in seconds [default: 10]."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Samples per request [default: 1]."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
) -> None:
    """Measures throughput, p50/p90/p99/max latency and errors by status code per concurrency level."""
    import asyncio
    import json

    import grpc
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from meshserve.loadgen import BenchSettings, LoadGenerator, report_dict
    from meshserve.settings import load

    console = Console()
    try:
        settings = load(
            BenchSettings,
            url=url,
            api_key=api_key,
            model_version=model_version,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            timeout=timeout,
            batch_size=batch_size,
        )
    except ValidationError as exc:
        for error in exc.errors():
            console.print(f"[red]invalid --{'-'.join(map(str, error['loc'])).replace('_', '-')}: {error['msg']}[/red]")
        raise typer.Exit(2) from None

    total_per_level = settings.warmup + settings.duration
    progress = Progress(
        TextColumn("c={task.fields[level]:>4}"),
        BarColumn(),
        TextColumn("{task.fields[requests]:>8} ok"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[int, TaskID] = {}

    def on_progress(level: int, elapsed_s: float, completed: int) -> None:
        # A level's bar appears when it starts, so a failed metadata call shows no empty bars.
        if level not in tasks:
            tasks[level] = progress.add_task("", total=total_per_level, level=level, requests=0)
        progress.update(tasks[level], completed=elapsed_s, requests=completed)

    console.print(
        f"meshserve bench {model} -> {settings.url}: concurrency {','.join(map(str, settings.concurrency))}, "
        f"{settings.duration:g}s each"
    )
    try:
        with progress:
            results = asyncio.run(LoadGenerator(settings).run(model, on_progress=on_progress))
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        console.print(f"[red]cannot read metadata of {model!r} at {settings.url}: {code}: {exc.details()}[/red]")
        raise typer.Exit(1) from None

    table = Table(title=f"{model} @ {settings.url} (batch {settings.batch_size})")
    for column in ("concurrency", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            str(r.requests),
            f"{r.throughput:.1f}",
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
            str(r.error_count),
        )
    console.print(table)
    # Codes go on their own lines: a narrow terminal would cut them off inside the table.
    for r in results:
        if r.errors:
            codes = ", ".join(f"{code} {n}" for code, n in r.errors.items())
            console.print(f"c={r.concurrency} errors by status code: {codes}", soft_wrap=True)
    if json_path is not None:
        json_path.write_text(json.dumps(report_dict(model, settings, results), indent=2, allow_nan=False, default=str))
        console.print(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("bench")(bench)

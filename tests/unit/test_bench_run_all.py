"""bench/run_all.py: bare ONNX Runtime joins the rounds as a peer where issue 2's compute limit is read."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench import bare_ort
from bench.run_all import Bench, Peer
from tests.worker_models import identity_model, save


def bench_with_peers(repository: Path) -> Bench:
    args = argparse.Namespace(models="mlp784,cnn", concurrency="1,8,32", duration=0.2)
    bench = Bench(args, repository, children=None)  # type: ignore[arg-type]  # nothing is started here
    bench.peers = [
        Peer("worker", "127.0.0.1:1", ("mlp784", "cnn"), {}),
        Peer("mesh+tracing", "127.0.0.1:2", ("mlp784", "cnn"), {}),
    ]
    return bench


def test_bare_ort_is_a_peer_only_for_the_compute_model_at_the_top_concurrency(tmp_path: Path) -> None:
    save(identity_model("FP32"), tmp_path, "cnn")
    bench = bench_with_peers(tmp_path)
    assert None not in bench._peers_for("cnn", 32)  # no sweep yet: nothing to re-measure
    bench.ort_sweep = {"cnn": bare_ort.measure(tmp_path / "cnn", [1, 4], 0.05, threads=1)}
    assert [p.name if p else None for p in bench._peers_for("cnn", 32)] == ["worker", None]
    assert None not in bench._peers_for("cnn", 8)
    assert None not in bench._peers_for("mlp784", 32)


def test_a_bare_ort_point_runs_the_sweeps_best_configuration_for_one_round(tmp_path: Path) -> None:
    save(identity_model("FP32"), tmp_path, "cnn")
    bench = bench_with_peers(tmp_path)
    sweep = bare_ort.measure(tmp_path / "cnn", [1, 4], 0.05, threads=1)
    bench.ort_sweep = {"cnn": sweep}
    best = bare_ort.best(sweep)

    point = asyncio.run(bench._bare_ort_point("cnn", 32, 2))

    assert (point.peer, point.model, point.concurrency, point.round) == ("bare-ort", "cnn", 32, 2)
    result = point.result
    assert result.duration_s == 0.2 and result.throughput > 0
    assert result.requests % best.batch_size == 0 and result.requests >= 3 * best.batch_size
    assert result.to_dict()["p50_ms"] is None  # no latencies: nothing waits on a client
    assert point.cpu_ms_per_request["bare-ort"] > 0

"""bench/report.py: the ratios and verdicts pasted into bench/RESULTS.md come out right."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import Target, cells, paired_p50_overhead, paired_ratio, render_markdown, targets


def point(peer: str, model: str, c: int, rnd: int, throughput: float, p50: float) -> dict[str, Any]:
    return {
        "peer": peer,
        "model": model,
        "concurrency": c,
        "round": rnd,
        "result": {
            "concurrency": c,
            "duration_s": 1.0,
            "requests": int(throughput),
            "errors": {},
            "throughput": throughput,
            "p50_ms": p50,
            "p90_ms": p50 * 2,
            "p99_ms": p50 * 3,
            "max_ms": p50 * 4,
            "mean_ms": p50,
        },
        "cpu_ms_per_request": {"client": 0.2},
    }


def run(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": "python -m bench.run_all",
        "started": "2026-01-01 00:00:00 UTC",
        "machine": {"nproc": 2, "cpu": "test cpu", "kernel": "6"},
        "versions": {"python": "3.11"},
        "settings": {
            "rounds": 2,
            "duration_s": 1.0,
            "warmup_s": 0.5,
            "concurrency": [1, 32],
            "mesh_workers": 1,
            "gateway_processes": 1,
            "triton_default_delay_us": 100,
        },
        "otlp_receiver": "SPANS 10 EXPORTS 1",
        "points": points,
        "bare_ort": {"cnn": [{"batch_size": 1, "samples_per_s": 50.0}, {"batch_size": 8, "samples_per_s": 100.0}]},
    }


def full_run() -> dict[str, Any]:
    points = []
    for rnd in (0, 1):
        points += [
            point("worker", "mlp784", 1, rnd, 1000, 1.0 + rnd),
            point("mesh", "mlp784", 1, rnd, 800, 1.3 + rnd),
            point("worker", "mlp784", 32, rnd, 3000, 10),
            point("mesh", "mlp784", 32, rnd, 2000, 15),
            point("mesh+tracing", "mlp784", 32, rnd, 1900, 16),
            point("triton", "mlp784", 32, rnd, 1500, 20),
            point("worker", "cnn", 1, rnd, 40, 25.0),
            point("mesh", "cnn", 1, rnd, 39, 26.0),
            point("worker", "cnn", 32, rnd, 90 + rnd * 2, 300),
            point("triton", "cnn", 32, rnd, 100, 320),
        ]
    return run(points)


def test_p50_overhead_pairs_mesh_and_worker_within_each_round() -> None:
    # Rounds differ by a whole millisecond; the hop is 0.3 ms in both.
    assert paired_p50_overhead(full_run()["points"], "mlp784") == pytest.approx(0.3)


def test_targets_compute_ratios_and_verdicts() -> None:
    data = full_run()
    by_what = {t.what: t for t in targets(data, cells(data["points"]))}
    worker_vs_triton = by_what["worker / Triton, mlp784, c=32"]
    assert worker_vs_triton.measured == 2.0 and worker_vs_triton.met
    vs_ort = by_what["worker c=32 / best batched bare ORT, cnn"]
    assert vs_ort.measured == pytest.approx(0.91) and vs_ort.met  # median of 90 and 92 over best batch 100
    cnn_vs_triton = by_what["worker / Triton (dynamic batcher), cnn, c=32"]
    assert cnn_vs_triton.met is False
    assert by_what["mesh / Triton, mlp784, c=32"].measured == 2000 / 1500
    tracing = by_what["tracing throughput cost (100% sampled, OTLP), mlp784, c=32"]
    assert tracing.measured == pytest.approx(5.0) and tracing.met


def test_a_tracing_cost_at_a_lower_sampling_ratio_is_reported_but_not_judged() -> None:
    data = full_run()
    data["settings"]["tracing_ratio"] = 0.1
    by_what = {t.what: t for t in targets(data, cells(data["points"]))}
    tracing = by_what["tracing throughput cost (10% sampled, OTLP), mlp784, c=32"]
    assert tracing.measured == pytest.approx(5.0) and tracing.met is None
    assert "| 5.0% | 5.0% .. 5.0% | - | <= 10% at 100% sampled | not the goal's setting |" in tracing.row()


def test_each_verdict_shows_its_spread_over_rounds_and_how_many_rounds_met_the_goal() -> None:
    data = full_run()
    # The hop per round: 0.3, 0.35, 0.5 ms; the verdict reads the median, 0.35 ms.
    data["points"] += [point("worker", "mlp784", 1, 2, 1000, 1.0), point("mesh", "mlp784", 1, 2, 800, 1.5)]
    data["points"] = [
        p for p in data["points"] if not (p["peer"] == "mesh" and p["concurrency"] == 1 and p["round"] == 1)
    ] + [point("mesh", "mlp784", 1, 1, 800, 2.35)]
    hop = {t.what: t for t in targets(data, cells(data["points"]))}["gateway hop p50 (mesh - worker), mlp784, c=1"]
    assert hop.per_round == pytest.approx((0.3, 0.35, 0.5))
    assert hop.measured == pytest.approx(0.35) and hop.met and hop.rounds_met == 2
    assert "| 0.350 ms | 0.300 ms .. 0.500 ms | 2 of 3 | <= 0.4 ms | met |" in hop.row()
    # A miss by a few microseconds must not print as the goal itself.
    missed = Target("5", "hop", 0.4037, "<= 0.4 ms", False, " ms", (0.4037,), 0)
    assert "| 0.404 ms | 0.404 ms .. 0.404 ms | 0 of 1 | <= 0.4 ms | **MISSED** |" in missed.row()


def test_markdown_marks_misses_and_missing_peers() -> None:
    data = full_run()
    data["points"] = [p for p in data["points"] if p["peer"] != "triton"]
    text = render_markdown(data)
    assert "`nproc` = 2" in text
    assert "| 2 | worker / Triton, mlp784, c=32 | n/a | - | - | >= 1.5x | not measured |" in text
    row = "| 5 | gateway hop p50 (mesh - worker), cnn, c=1 | 1.000 ms | 1.000 ms .. 1.000 ms | 0 of 2 | <= 0.4 ms |"
    assert f"{row} **MISSED** |" in text
    # An old run's compute limit is one figure against the sweep: no spread over rounds.
    assert "| 2 | worker c=32 / best batched bare ORT, cnn | 0.91x | - | - | >= 0.85x | met |" in text
    assert "### mlp784" in text and "### cnn" in text
    assert "best: 100 samples/s (b8" in text


def test_bare_proxy_floor_is_reported_next_to_the_gateway_hop() -> None:
    data = full_run()
    for rnd in (0, 1):
        bare = point("bare-proxy", "mlp784", 1, rnd, 900, 1.2 + rnd)
        bare["client_switches_per_request"] = 2.5
        data["points"].append(bare)
    assert paired_p50_overhead(data["points"], "mlp784", front="bare-proxy") == pytest.approx(0.2)
    markdown = render_markdown(data)
    assert "bare grpc.aio byte proxy" in markdown
    assert "adds 0.20 ms p50" in markdown and "adds 0.30 ms" in markdown
    assert "| 1 | bare-proxy | 900 |" in markdown and "| 2.5 |" in markdown


def test_busy_wait_gain_is_the_mesh_over_the_same_mesh_without_it() -> None:
    data = full_run()
    assert "Busy waits" not in render_markdown(data)  # no such peer in the run: no line
    for rnd in (0, 1):
        data["points"].append(point("mesh-no-busy-wait", "mlp784", 1, rnd, 800, 1.3))
        data["points"].append(point("mesh-no-busy-wait", "mlp784", 32, rnd, 1250, 25))
    markdown = render_markdown(data)
    assert "the mesh / the same mesh with both off, mlp784: 1.00x at c=1, 1.60x at c=32." in markdown
    assert "| 32 | mesh-no-busy-wait | 1250 |" in markdown


def test_light_load_poll_gain_is_the_hop_and_the_mesh_over_the_same_mesh_without_it() -> None:
    data = full_run()
    assert "Light-load poll" not in render_markdown(data)  # no such peer in the run: no line
    for rnd in (0, 1):
        data["points"].append(point("mesh-no-poll", "mlp784", 1, rnd, 640, 1.5 + rnd))
        data["points"].append(point("mesh-no-poll", "mlp784", 32, rnd, 2000, 15))
    markdown = render_markdown(data)
    # The worker's p50 is 1.0 (+rnd) at c=1: the hop is 0.30 ms with the poll (the mesh), 0.50 ms without.
    assert "- mlp784: gateway hop p50 at c=1 0.30 ms with it, 0.50 ms with it off" in markdown
    assert "the mesh / the same mesh with it off: 1.25x at c=1, 1.00x at c=32." in markdown
    assert "| 1 | mesh-no-poll | 640 |" in markdown
    assert "- cnn:" not in markdown  # no cnn point without the poll: no cnn line


def test_target_ratios_pair_the_peers_within_each_round() -> None:
    # The machine runs at a different speed in each round; within two of three rounds the worker does
    # 1.5x Triton, in the third 1.25x. The ratio of the medians (3300 / 2640) would read 1.25x.
    points = []
    for rnd, speed in ((0, 1.0), (1, 2.0), (2, 1.1)):
        points += [
            point("worker", "mlp784", 32, rnd, 3000 * speed, 10),
            point("triton", "mlp784", 32, rnd, 2000 * speed * (1.2 if rnd == 2 else 1.0), 10),
        ]
    assert paired_ratio(points, "mlp784", "worker", "triton", 32) == pytest.approx(1.5)
    data = run(points)
    data["settings"]["concurrency"] = [32]
    by_what = {t.what: t for t in targets(data, cells(points))}
    assert by_what["worker / Triton, mlp784, c=32"].measured == pytest.approx(1.5)


def test_the_compute_limit_is_bare_ort_measured_in_the_same_rounds_when_the_run_has_it() -> None:
    data = full_run()
    # The sweep read 100 samples/s; in the rounds, beside the worker's 90 and 92 req/s, bare ORT read 95 and 115.
    data["points"] += [point("bare-ort", "cnn", 32, 0, 95, float("nan")), point("bare-ort", "cnn", 32, 1, 115, 1)]
    for p in data["points"]:
        if p["peer"] == "bare-ort":
            p["result"].update(p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None, mean_ms=None)
    table = cells(data["points"])
    by_what = {t.what: t for t in targets(data, table)}
    vs_ort = by_what["worker c=32 / best batched bare ORT, cnn"]
    assert vs_ort.measured == pytest.approx((90 / 95 + 92 / 115) / 2)
    text = render_markdown(data)
    assert "round by round: 90 / 95 = 0.95x; 92 / 115 = 0.80x (the target is their median)" in text
    assert "read 100 samples/s for that configuration" in text
    assert "| 32 | bare-ort | 105 | - | - | - | - | 0 |" in text

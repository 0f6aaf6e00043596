"""One measured point: a peer's client at one concurrency, with the CPU every process spent on it."""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from bench.processes import Child
from bench.tritonclient_load import TritonClientLoad
from meshserve.loadgen import LevelResult


@dataclass
class Point:
    """One peer at one concurrency on one model in one round."""

    peer: str
    model: str
    concurrency: int
    round: int
    result: LevelResult
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    # The load generator's voluntary context switches per request: how often it had to sleep and be woken
    # for responses (a server that answers a batch in one burst wakes it less).
    client_switches_per_request: float | None = None


async def measure_point(
    peer: str,
    client: TritonClientLoad,
    processes: Mapping[str, Child],
    model: str,
    feeds: dict[str, np.ndarray],
    concurrency: int,
    round_index: int,
    duration_s: float,
    warmup_s: float,
) -> Point:
    """Closed-loop load for warm-up + duration; CPU per request of the client and of each process."""
    cpu_before = {name: child.cpu_seconds() for name, child in processes.items()}
    client_before = time.process_time()
    switches_before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    result = await client.run(model, feeds, concurrency, duration_s, warmup_s)
    client_cpu = time.process_time() - client_before
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches_before
    cpu_after = {name: child.cpu_seconds() for name, child in processes.items()}
    # CPU spent over warm-up + measured window, per request measured: a per-request cost estimate.
    completed = max(result.requests, 1) * (warmup_s + duration_s) / duration_s
    per_request = {"client": client_cpu / completed * 1000.0}
    for name in processes:
        per_request[name] = (cpu_after[name] - cpu_before[name]) / completed * 1000.0
    return Point(peer, model, concurrency, round_index, result, per_request, switches / completed)

"""A minimal OTLP/gRPC trace collector for the tracing benchmark: accepts exports and counts spans.

Runs as its own process (`python -m bench.otlp_receiver --port P`) so that,
like a real collector, it does not share the load generator's interpreter.
On SIGTERM it prints the totals as `SPANS <n> EXPORTS <m>`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

READY_LINE = "OTLP RECEIVER READY"


class CountingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._lock:
            self.spans += count
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    service = CountingTraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.max_receive_message_length", -1)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    print(READY_LINE, flush=True)
    stopped.wait()
    server.stop(grace=1).wait()
    print(f"SPANS {service.spans} EXPORTS {service.exports}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

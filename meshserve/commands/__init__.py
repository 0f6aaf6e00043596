"""One module per CLI command group. Each exposes `register(app)` and imports
heavy dependencies (onnxruntime, grpc servers) inside its command bodies so
that `meshserve --help` and light commands start fast."""


def freeze_startup_objects() -> None:
    """Moves every object alive after a server's start-up out of the cyclic GC's reach.

    Imports, protobuf descriptors, the gRPC server and the loaded models leave
    ~80,000 GC-tracked objects that live as long as the process, and each full
    collection walked them all: a busy gateway (mlp784, c=32) stopped for ~23 ms
    every second or two, every request in flight waiting; frozen, those pauses
    measured ~5 ms. Throughput did not change beyond this box's noise.
    Reference counting still frees them; only a cycle among them would now stay.
    """
    import gc

    gc.collect()
    gc.freeze()

"""One module per CLI command group. Each exposes `register(app)` and imports
heavy dependencies (onnxruntime, grpc servers) inside its command bodies so
that `meshserve --help` and light commands start fast."""

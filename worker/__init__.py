"""The worker process: model repository, ONNX Runtime sessions, dynamic batcher,
KServe v2 servicer, self-registration and drain."""

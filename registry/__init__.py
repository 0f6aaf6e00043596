"""Service registration and discovery: the Consul backend (py-consul) and the
embedded development agent. Knows nothing of the gateway or the worker."""

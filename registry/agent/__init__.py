"""The embedded Consul-compatible agent (`meshserve registry`): one process, in memory,
serving the HTTP API subset in consul-api.md for one machine."""

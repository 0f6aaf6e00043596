"""Client-side load balancing: discovery (endpoint changes), load (per-endpoint
cost), policies (which only compare loads), outlier ejection, and the retry /
failover / hedging policy. Knows nothing of the gateway or the worker.

The gateway codes against `Balancer` (see docs/internals.md, "Load balancer").
"""

"""Client-side load balancing: discovery (endpoint changes), load (per-endpoint
cost), balancer (policies that only compare loads), outlier ejection, and the
retry / failover / hedging policy. Knows nothing of the gateway or the worker."""

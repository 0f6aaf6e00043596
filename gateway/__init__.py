"""The public gRPC front door: auth, rate limits, routing, byte-forwarding to
workers through the load balancer."""

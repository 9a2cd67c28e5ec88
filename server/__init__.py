"""bpfexec gRPC service: module cache, execution scheduling, helpers, metrics."""

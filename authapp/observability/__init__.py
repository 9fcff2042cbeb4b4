"""Request ids, timing, JSON logs and Prometheus metrics."""

"""Kubernetes: sidecar injection (``inject``, pure) and the mutating admission webhook (``webhook``)."""

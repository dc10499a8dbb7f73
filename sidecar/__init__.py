"""sidecar: discovery and routing for networks of AI agents."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `sidecar.Registry` without importing etcd for every `import sidecar`.
    if name == "Registry":
        from .registry.api import Registry

        return Registry
    raise AttributeError(name)

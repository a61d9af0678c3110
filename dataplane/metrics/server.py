"""The /metrics HTTP endpoint: serve() registers the collectors (and nothing else: no process or
platform collectors) and answers scrapes on 127.0.0.1:9477 unless told otherwise."""

from __future__ import annotations

from prometheus_client.registry import Collector, CollectorRegistry

DEFAULT_HOST = "127.0.0.1"   # counters describe the host's traffic: not for the whole network
DEFAULT_PORT = 9477


class MetricsServer:
    """The HTTP endpoint serve() started; close() stops it and frees the port."""

    def __init__(self, server, thread, registry: CollectorRegistry):
        self.server, self.thread, self.registry = server, thread, registry

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return host, port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(*collectors: Collector, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT) -> MetricsServer:
    """Serve /metrics for these collectors alone on host:port; port 0 picks a free one (see
    .address)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, registry)

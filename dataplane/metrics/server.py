"""The /metrics HTTP endpoint: serve() registers the collectors (and nothing else: no process or
platform collectors) and answers scrapes on 127.0.0.1:9477 unless told otherwise.

A web config (dataplane.metrics.webconfig) adds TLS, client certificates and basic auth.  At most
`max_connections` connections are served at once, each for at most `timeout` seconds; one more
is closed as soon as it is accepted and counted in dataplane_exporter_rejected_connections_total.

The server is ours rather than prometheus_client's start_http_server because that one wraps the
listening socket in TLS, so the handshake runs inside accept(), in the one thread that accepts:
a client that connects and says nothing stalls every scrape.  Here each connection's handshake
runs in its own thread, under the connection bound and the timeout.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qsl
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
    gzip_accepted,
)
from prometheus_client.registry import Collector, CollectorRegistry

from dataplane.metrics.families import exposition
from dataplane.metrics.webconfig import TlsServer, WebConfig

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"   # counters describe the host's traffic: not for the whole network
DEFAULT_PORT = 9477
DEFAULT_MAX_CONNECTIONS = 8  # a Prometheus or two and a person with curl
DEFAULT_TIMEOUT = 10.0       # seconds a connection may take for its handshake and request
AUTH_REASONS = ("tls_handshake", "client_san", "basic_auth")


class ExporterStats(Collector):
    """What the endpoint refused, exported with the other families."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rejected = 0
        self.auth_failures = dict.fromkeys(AUTH_REASONS, 0)

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def auth_failure(self, reason: str) -> None:
        with self.lock:
            self.auth_failures[reason] += 1

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            rejected, failures = self.rejected, dict(self.auth_failures)
        c = CounterMetricFamily(
            "dataplane_exporter_rejected_connections_total",
            "Connections to the metrics endpoint closed unserved: max_connections were open")
        c.add_metric([], rejected)
        yield c
        a = CounterMetricFamily(
            "dataplane_exporter_auth_failures_total",
            "Metrics requests refused: TLS handshake failed (or timed out), client certificate"
            " without an allowed SAN, or basic auth without the right user and password",
            labels=["reason"])
        for reason, n in failures.items():
            a.add_metric([reason], n)
        yield a


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape is not worth a log line."""


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most `limit` at once; TLS per connection, in its thread."""

    daemon_threads = True   # a connection stuck until its timeout does not hold up close()

    def __init__(self, host: str, port: int, tls: TlsServer | None, limit: int, timeout: float,
                 stats: ExporterStats):
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.tls, self.ctx = tls, tls.context() if tls is not None else None
        self.slots = threading.BoundedSemaphore(limit)
        self.conn_timeout, self.stats = timeout, stats
        self.active = 0
        self.active_lock = threading.Lock()
        super().__init__(sockaddr[:2], _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # the accepting thread: never blocks here, an excess connection is closed at once
        if not self.slots.acquire(blocking=False):
            self.stats.reject()
            self.shutdown_request(request)
            return
        with self.active_lock:
            self.active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self.active_lock:
            self.active -= 1
        self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the timeout bounds each read and write, and the watchdog the whole connection: a
        # client trickling a byte now and then would otherwise keep its slot for ever.  It
        # shuts the socket down through a duplicate, which stays valid whatever this thread
        # has done with the original (wrapped it in TLS, closed it).
        request.settimeout(self.conn_timeout)
        dup = request.dup()
        watchdog = threading.Timer(self.conn_timeout, _shut, (dup,))
        watchdog.start()
        try:
            self._serve_connection(request, client_address)
        finally:
            watchdog.cancel()
            dup.close()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        if self.ctx is None:
            self.RequestHandlerClass(request, client_address, self)
            return
        try:
            conn = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:   # plain HTTP, no client certificate, silence
            self.stats.auth_failure("tls_handshake")
            log.debug("metrics: TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            assert self.tls is not None
            if self.tls.san_allowed(conn.getpeercert()):
                self.RequestHandlerClass(conn, client_address, self)
            else:
                self.stats.auth_failure("client_san")
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that times out or resets is its own problem: no traceback on stderr
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass    # already gone


App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def basic_auth(app: App, users: dict[str, bytes], stats: ExporterStats) -> App:
    """`app` behind HTTP basic auth: 401 with WWW-Authenticate unless the user and password
    match a bcrypt hash of `users`."""
    import bcrypt

    # an unknown user is checked against a real hash too, so the time taken does not say
    # which users exist
    decoy = next(iter(users.values()))

    def check(header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        pw = password.encode()
        if not sep or len(pw) > 72:       # bcrypt uses 72 bytes at most, and refuses more
            return False
        ok = bcrypt.checkpw(pw, users.get(user, decoy))   # compares in constant time
        return ok and user in users

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if check(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        stats.auth_failure("basic_auth")
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="dataplane"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"Unauthorized\n"]

    return wrapped


def metrics_app(registry: CollectorRegistry) -> App:
    """prometheus_client's WSGI app, except that a GET of the text format 0.0.4 (what that app
    would answer with generate_latest) is written by families.exposition: the same bytes at a
    fraction of the CPU, which a run's consumer loop shares.  OpenMetrics, the 1.0.0 text
    format, `name[]` filters and other methods go to prometheus_client's app unchanged."""
    fallback = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        if (environ.get("REQUEST_METHOD") != "GET" or "name[]" in query
                or environ.get("PATH_INFO") == "/favicon.ico"
                or choose_encoder(environ.get("HTTP_ACCEPT"))[0] is not generate_latest):
            return fallback(environ, start_response)
        body = exposition(registry.collect())
        headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


Route = Callable[[dict[str, str]], Any]


def routed(app: App, routes: dict[str, Route]) -> App:
    """`app`, but a path of `routes` answers JSON: route(query) as a document, 400 with its
    message when it raises ValueError (a bad query)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return app(environ, start_response)
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        try:
            body, status = json.dumps(route(query)), "200 OK"
        except ValueError as e:
            body, status = json.dumps({"error": str(e)}), "400 Bad Request"
        data = body.encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]

    return wrapped


class MetricsServer:
    """The HTTP endpoint serve() started; close() stops it and frees the port."""

    def __init__(self, server: _Server, thread: threading.Thread, registry: CollectorRegistry,
                 stats: ExporterStats):
        self.server: _Server | None = server
        self.thread, self.registry, self.stats = thread, registry, stats
        self.scheme = "https" if server.ctx is not None else "http"
        self.address: tuple[str, int] = server.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    @property
    def active(self) -> int:
        """Connections being served now."""
        return self.server.active if self.server is not None else 0

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(*collectors: Collector, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          web: WebConfig | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          timeout: float = DEFAULT_TIMEOUT,
          routes: dict[str, Route] | None = None) -> MetricsServer:
    """Serve /metrics for these collectors alone (and the endpoint's own counters) on
    host:port; port 0 picks a free one (see .address).  `web`: TLS and basic auth, for
    `routes` too (path -> a function of the query answering JSON, e.g. /flows)."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    stats = ExporterStats()
    registry.register(stats)
    app: App = routed(metrics_app(registry), routes or {})
    if web is not None and web.users:
        app = basic_auth(app, web.users, stats)
    server = _Server(host, port, web.tls if web is not None else None, max_connections,
                     timeout, stats)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, registry, stats)

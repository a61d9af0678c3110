"""The metrics endpoint's defences over real sockets: TLS with certificates made here by the
openssl CLI, client certificates, basic auth with bcrypt hashes, the bound on concurrent
connections, and the web-config file's checks (promtool accepts the example we ship)."""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from dataplane import config
from dataplane.config import ConfigError
from dataplane.metrics import webconfig
from dataplane.metrics.server import MetricsServer, serve
from tests.helpers.metrics import metric

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config/web-config.example.yml"
PASSWORD = "correct horse"
REFUSED = (ssl.SSLError, ConnectionError)   # a TLS alert, a reset, or a close mid-request


class Pki:
    """A CA, a server certificate for 127.0.0.1 and client certificates, in one directory."""

    def __init__(self, d: Path):
        self.d = d
        self.ca = self.authority("ca")
        self.server = self.leaf("server", "IP:127.0.0.1", self.ca)

    def openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.d, check=True, capture_output=True,
                       timeout=60)

    def authority(self, name: str) -> str:
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                     "-subj", f"/CN={name}")
        return name

    def leaf(self, name: str, san: str, ca: str) -> str:
        """name.crt and name.key (mode 0600), signed by `ca`, with subjectAltName `san`."""
        (self.d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        self.openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                     "-subj", f"/CN={name}")
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
                     f"{ca}.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
                     "-extfile", f"{name}.ext")
        (self.d / f"{name}.key").chmod(0o600)
        return name

    def client_context(self, cert: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.d / f"{self.ca}.crt"))
        if cert is not None:
            ctx.load_cert_chain(self.d / f"{cert}.crt", self.d / f"{cert}.key")
        return ctx

    def web(self, text: str) -> webconfig.WebConfig:
        f = self.d / "web.yml"
        f.write_text(text)
        return webconfig.load(f)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"


def get(srv: MetricsServer, ctx: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """GET /metrics: status, headers, body.  TLS when ctx is given."""
    host, port = srv.address
    conn = (http.client.HTTPSConnection(host, port, context=ctx, timeout=10) if ctx else
            http.client.HTTPConnection(host, port, timeout=10))
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        conn.request("GET", "/metrics", headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


def wait_for(what: Callable[[], bool], why: str, timeout: float = 10) -> None:
    """Until what() holds; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.01)


def test_the_default_is_loopback_plain_http() -> None:
    m = config.load().metrics
    assert (m.host, m.web_config, m.web) == ("127.0.0.1", None, None)
    with serve(port=0) as srv:
        assert srv.address[0] == "127.0.0.1" and srv.url.startswith("http://127.0.0.1:")
        status, _, body = get(srv)
        assert status == 200 and "dataplane_exporter_rejected_connections_total 0.0" in body


def test_tls_scrape_with_the_ca_and_plain_http_refused(pki: Pki) -> None:
    with serve(port=0, web=pki.web(TLS)) as srv:
        assert srv.url.startswith("https://")
        status, _, body = get(srv, pki.client_context())
        assert status == 200 and "dataplane_exporter_auth_failures_total" in body
        with pytest.raises((http.client.HTTPException, *REFUSED)):
            get(srv)                                  # plain HTTP to the TLS port
        # a client that does not trust the server's CA refuses it, too
        with pytest.raises(ssl.SSLCertVerificationError):
            get(srv, ssl.create_default_context())
        wait_for(lambda: srv.stats.auth_failures["tls_handshake"] == 2,
                 f"handshake failures counted: {srv.stats.auth_failures}")


def test_client_certificate_required(pki: Pki) -> None:
    pki.leaf("scraper", "DNS:prometheus", pki.ca)
    pki.authority("rogue-ca")
    pki.leaf("rogue", "DNS:prometheus", "rogue-ca")
    with serve(port=0, web=pki.web(MTLS)) as srv:
        with pytest.raises(REFUSED):
            get(srv, pki.client_context())            # no certificate
        with pytest.raises(REFUSED):
            get(srv, pki.client_context("rogue"))     # one the CA did not sign
        status, _, _ = get(srv, pki.client_context("scraper"))
        assert status == 200
        wait_for(lambda: srv.stats.auth_failures["tls_handshake"] == 2,
                 f"refusals counted: {srv.stats.auth_failures}")


def test_client_allowed_sans(pki: Pki) -> None:
    pki.leaf("scraper", "DNS:prometheus", pki.ca)
    pki.leaf("other", "DNS:somebody-else", pki.ca)
    web = pki.web(MTLS + "  client_allowed_sans: [prometheus]\n")
    with serve(port=0, web=web) as srv:
        with pytest.raises((http.client.HTTPException, *REFUSED)):
            get(srv, pki.client_context("other"))
        assert get(srv, pki.client_context("scraper"))[0] == 200
        assert srv.stats.auth_failures["client_san"] == 1


def test_basic_auth(pki: Pki) -> None:
    h = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    # htpasswd writes $2y$: the exporters' example hashes look like that
    web = pki.web(TLS + f"basic_auth_users:\n  alice: {h}\n  bob: $2y${h[4:]}\n")
    ctx = pki.client_context()
    with serve(port=0, web=web) as srv:
        for auth in (None, ("alice", "wrong"), ("mallory", PASSWORD), ("alice", "x" * 100)):
            status, headers, body = get(srv, ctx, auth)
            assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="dataplane"'
            assert "dataplane_" not in body, auth
        for user in ("alice", "bob"):
            status, _, body = get(srv, ctx, (user, PASSWORD))
            assert status == 200
        assert metric(body, "dataplane_exporter_auth_failures_total", reason="basic_auth") == 4


def test_connection_bound(pki: Pki) -> None:
    n = 3
    with serve(port=0, max_connections=n, timeout=60) as srv:
        slow = [socket.create_connection(srv.address, timeout=10) for _ in range(n)]
        try:
            # each holds its slot: connected, request not sent
            wait_for(lambda: srv.active == n, f"{srv.active} of {n} connections being served")
            extra = socket.create_connection(srv.address, timeout=10)
            with extra:
                assert extra.recv(1) == b"", "the connection over the bound was served"
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                get(srv)                              # a scrape is refused too, not queued
            assert srv.stats.rejected == 2
        finally:
            for s in slow:
                s.close()
        wait_for(lambda: srv.active == 0, f"{srv.active} connections still served")
        status, _, body = get(srv)
        assert status == 200
        assert metric(body, "dataplane_exporter_rejected_connections_total") == 2


def test_a_silent_tls_client_does_not_stall_scrapes(pki: Pki) -> None:
    # The handshake runs in the connection's own thread, not in accept(): a client that
    # connects and says nothing holds one slot until the timeout, and nobody else waits.
    with serve(port=0, web=pki.web(TLS), timeout=60) as srv:
        with socket.create_connection(srv.address, timeout=10):
            wait_for(lambda: srv.active == 1, "the silent connection was not accepted")
            assert get(srv, pki.client_context())[0] == 200


def test_a_connection_gets_the_timeout(pki: Pki) -> None:
    with serve(port=0, web=pki.web(TLS), timeout=0.5) as srv:
        with socket.create_connection(srv.address, timeout=10) as s:
            assert s.recv(1) == b""                   # closed by the server, not by us
        wait_for(lambda: srv.stats.auth_failures["tls_handshake"] == 1, "timeout not counted")


def test_a_trickling_client_is_cut_off() -> None:
    # a header line every 0.1 s never lets one read time out: the whole connection's timeout
    # closes it, and the slot is free again
    with serve(port=0, max_connections=1, timeout=1.0) as srv:
        with socket.create_connection(srv.address, timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n")
            with pytest.raises(OSError):             # reset, or a broken pipe
                for i in range(200):                 # 20 s: only bounds a failure
                    s.sendall(b"X-%d: y\r\n" % i)
                    time.sleep(0.1)
        wait_for(lambda: srv.active == 0, "the trickling connection still holds its slot")
        assert get(srv)[0] == 200


def problems(pki: Pki, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        pki.web(text)
    return "\n".join(e.value.problems)


def test_web_config_errors_name_the_key(pki: Pki) -> None:
    assert "tls_server_config.cert_fille: unknown key (did you mean cert_file?)" in \
        problems(pki, TLS + "  cert_fille: x\n")
    assert "basic_auth_user: unknown key (did you mean basic_auth_users?)" in \
        problems(pki, "basic_auth_user: {}\n")
    assert 'tls_server_config.cert_file = "nothere.crt": cannot be read' in \
        problems(pki, TLS.replace("server.crt", "nothere.crt"))
    assert 'client_auth_type = "RequestClientCert": expected one of' in \
        problems(pki, TLS + "  client_auth_type: RequestClientCert\n")
    assert "tls_server_config.client_ca_file: missing" in \
        problems(pki, TLS + "  client_auth_type: RequireAndVerifyClientCert\n")
    assert 'min_version = "TLS11": expected one of TLS12, TLS13' in \
        problems(pki, TLS + "  min_version: TLS11\n")
    assert "basic_auth_users.alice" in problems(pki, "basic_auth_users:\n  alice: secret\n")
    assert "rate_limit" in problems(pki, "rate_limit: {interval: 1s, burst: 2}\n")
    assert "not valid YAML" in problems(pki, "tls_server_config: [\n")
    pki.leaf("other", "IP:127.0.0.1", pki.ca)
    mismatch = TLS.replace("server.key", "other.key")
    assert "does not load with key_file" in problems(pki, mismatch)


def test_a_key_readable_by_others_is_refused(pki: Pki) -> None:
    pki.leaf("loose", "IP:127.0.0.1", pki.ca)
    (pki.d / "loose.key").chmod(0o644)
    text = TLS.replace("server.", "loose.")
    assert "tls_server_config.key_file" in problems(pki, text)
    assert "readable or writable by others (mode 0644)" in problems(pki, text)
    (pki.d / "loose.key").chmod(0o640)        # a group (ssl-cert) may read it
    assert pki.web(text).tls is not None


def test_the_config_names_metrics_web_config(pki: Pki) -> None:
    (pki.d / "bad.yml").write_text("tls_server_config:\n  certfile: x\n")
    base = (ROOT / "config/default.toml").read_text()
    with pytest.raises(ConfigError) as e:
        config.loads(base.replace('listen = "127.0.0.1:9477"', 'listen = "127.0.0.1:9477"\n'
                                  f'web_config = "{pki.d / "bad.yml"}"\nmax_connections = 0'))
    text = str(e.value)
    assert f'metrics.web_config = "{pki.d / "bad.yml"}": tls_server_config.certfile: ' \
           "unknown key" in text
    assert "metrics.max_connections = 0: expected 1..1024" in text
    # TLS and a password on a public address: no warning that anyone reads the counters
    (pki.d / "ok.yml").write_text(MTLS)
    cfg = config.loads(base.replace('listen = "127.0.0.1:9477"',
                                    f'listen = "0.0.0.0:9477"\nweb_config = "{pki.d / "ok.yml"}"'))
    assert cfg.metrics.web.authenticates and not any("not loopback" in w for w in cfg.warnings)


def example_beside_its_files(pki: Pki, d: Path) -> Path:
    """The shipped example in a directory with the files it names (relative to it)."""
    for name, src in (("metrics.crt", "server.crt"), ("metrics.key", "server.key"),
                      ("scrapers-ca.crt", "ca.crt")):
        shutil.copy(pki.d / src, d / name)
    (d / "metrics.key").chmod(0o600)
    shutil.copy(EXAMPLE, d / "web-config.yml")
    return d / "web-config.yml"


def test_the_example_serves(pki: Pki, tmp_path: Path) -> None:
    web = webconfig.load(example_beside_its_files(pki, tmp_path))
    assert web.authenticates and web.users and web.tls is not None
    pki.leaf("scraper", "DNS:prometheus", pki.ca)
    with serve(port=0, web=web) as srv:
        # the example's password is one nobody knows: only a certificate gets a 401
        status, _, _ = get(srv, pki.client_context("scraper"), ("prometheus", "guess"))
        assert status == 401
        with pytest.raises(REFUSED):
            get(srv, pki.client_context(), ("prometheus", "guess"))


def test_the_docs_metrics_table_loads(pki: Pki, tmp_path: Path) -> None:
    # docs/metrics.md's [metrics] table, with its web config path pointing at the example (the
    # docs' own check puts fragments on the default config, whose [metrics] would clash)
    docs = (ROOT / "docs/metrics.md").read_text()
    block = docs.split("```toml\n# metrics.toml\n", 1)[1].split("```", 1)[0]
    assert 'web_config = "/etc/dataplane/web-config.yml"' in block
    block = block.replace("/etc/dataplane/web-config.yml",
                          str(example_beside_its_files(pki, tmp_path)))
    base = (ROOT / "config/default.toml").read_text()
    start = base.index("[metrics]\n")
    end = base.index("\n[", start + 1)
    cfg = config.loads(base[:start] + block + base[end:])
    assert cfg.metrics.web.authenticates and cfg.metrics.max_connections == 8
    assert cfg.metrics.host == "0.0.0.0"


def test_promtool_accepts_the_example(pki: Pki, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/bootstrap.sh installs Debian's prometheus)")
    f = example_beside_its_files(pki, tmp_path)
    r = subprocess.run([promtool, "check", "web-config", f.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr

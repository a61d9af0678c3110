"""The metrics endpoint's web config: the YAML file format Prometheus exporters share
(`tls_server_config`, `basic_auth_users` with bcrypt hashes), read once when the config loads.

`[metrics] web_config = "/etc/dataplane/web.yml"` names the file; config/web-config.example.yml
is an example.  Every key is checked as the TOML config's are (dataplane.config.tables), so a
typo or a key this exporter does not implement is an error naming its key path, never a
setting silently ignored.  Relative file names are relative to the web config's directory, as
the exporters read them.  The files are checked here, at load: the certificate and the key
exist, the key is not readable by others, and they load into a TLS context together.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.config.tables import ConfigError, Problems, Table

# client_auth_type values, as the exporters name them, to what Python's ssl module can do.
# RequestClientCert and RequireAnyClientCert accept a certificate without verifying it: nothing
# gained over no certificate, and ssl cannot express them, so they are refused.
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE,
               "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# bcrypt as htpasswd -B and the bcrypt package write it: $2a$/$2b$/$2y$, cost, 53 characters
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_UNSUPPORTED = "not supported by this exporter"


@dataclass(frozen=True)
class TlsServer:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    def context(self) -> ssl.SSLContext:
        """A server context for these files (raises ssl.SSLError/OSError if they do not load)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = TLS_VERSIONS[self.max_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        return ctx

    def san_allowed(self, peer: dict[str, Any] | None) -> bool:
        """Whether a verified client certificate has one of client_allowed_sans (any, if the
        list is empty)."""
        if not self.client_allowed_sans:
            return True
        sans = {value for _, value in (peer or {}).get("subjectAltName", ())}
        return bool(sans & set(self.client_allowed_sans))


@dataclass(frozen=True)
class WebConfig:
    source: str
    tls: TlsServer | None = None
    users: dict[str, bytes] = field(default_factory=dict)   # user -> bcrypt hash

    @property
    def authenticates(self) -> bool:
        """Whether a scraper must prove who it is (a password or a verified certificate)."""
        return bool(self.users) or (self.tls is not None and
                                    self.tls.client_auth_type == "RequireAndVerifyClientCert")


def load(path: str | Path) -> WebConfig:
    """Read and check a web config file; every problem is raised together in one ConfigError."""
    import yaml

    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(source, [f"cannot read: {e.strerror}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {e}"]) from None
    if data is None:     # an empty file: plain HTTP, no passwords, as the exporters read it
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["expected a mapping of tls_server_config and "
                                   "basic_auth_users"])
    p = Problems()
    top = Table(p, "", data)
    tls = (_tls(top.table("tls_server_config"), Path(path).parent)
           if "tls_server_config" in data else None)
    top.known.append("tls_server_config")
    users = _users(top.table("basic_auth_users"))
    top.refuse("http_server_config", f"{_UNSUPPORTED} (it serves HTTP/1.0, no extra headers)")
    top.refuse("rate_limit", f"{_UNSUPPORTED}; [metrics] max_connections bounds the load")
    top.close()
    if p.errors:
        raise ConfigError(source, p.errors)
    return WebConfig(source, tls, users)


def _tls(t: Table, base: Path) -> TlsServer | None:
    errors = len(t.p.errors)
    for k in ("cert", "key", "client_ca"):
        t.refuse(k, f"inline PEM is {_UNSUPPORTED}; name a file with {k}_file")
    for k in ("cipher_suites", "curve_preferences", "prefer_server_cipher_suites"):
        t.refuse(k, f"{_UNSUPPORTED} (OpenSSL's defaults for the TLS version apply)")
    cert = t.get("cert_file", str, check=_file(base))
    key = t.get("key_file", str, check=_file(base, private=True))
    auth = t.get("client_auth_type", str, "NoClientCert", choices=tuple(CLIENT_AUTH))
    ca = t.get("client_ca_file", str, None, check=_file(base))
    sans = t.get("client_allowed_sans", list, [],
                 check=lambda v: None if all(isinstance(s, str) and s for s in v)
                 else "expected a list of names")
    lo = t.get("min_version", str, "TLS12", choices=tuple(TLS_VERSIONS))
    hi = t.get("max_version", str, "TLS13", choices=tuple(TLS_VERSIONS))
    t.close()
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and ca is None:
        t.error("client_ca_file", None, f"missing; client_auth_type = {auth} verifies client "
                "certificates against it")
    if auth == "NoClientCert" and ca is not None:
        t.error("client_ca_file", ca, "unused with client_auth_type = NoClientCert")
    if auth != "RequireAndVerifyClientCert" and sans:
        t.error("client_allowed_sans", sans, "needs client_auth_type = "
                "RequireAndVerifyClientCert (else a client can send no certificate)")
    if lo and hi and TLS_VERSIONS[lo] > TLS_VERSIONS[hi]:
        t.error("min_version", lo, f"above max_version = {hi}")
    if len(t.p.errors) > errors or None in (cert, key, auth, lo, hi):
        return None
    tls = TlsServer(base / cert, base / key, auth, None if ca is None else base / ca,
                    tuple(sans), lo, hi)
    try:
        tls.context()
    except (ssl.SSLError, OSError) as e:
        t.error("cert_file", cert, f"does not load with key_file = {key}: {e}")
        return None
    return tls


def _file(base: Path, private: bool = False):
    """A check: the file exists (relative to the web config's directory); a private key must
    not be readable or writable by others."""
    def check(v: str) -> str | None:
        f = base / v
        try:
            st = f.stat()
        except OSError as e:
            return f"cannot be read: {e.strerror}"
        if not f.is_file():
            return "expected a file"
        if private and st.st_mode & 0o006:
            return (f"readable or writable by others (mode {st.st_mode & 0o777:04o}); "
                    f"chmod o-rw {f}")
        return None
    return check


def _users(t: Table) -> dict[str, bytes]:
    users = {}
    for name, h in t.data.items():
        t.known.append(name)
        if not isinstance(name, str) or not name or ":" in name:
            t.error(str(name), None, "expected a user name without ':'")
        elif not isinstance(h, str) or not _BCRYPT.fullmatch(h):
            t.error(name, "<hidden>", "expected a bcrypt hash ($2y$10$ and 53 characters; "
                    "htpasswd -nBC 10 \"\" | tr -d ':\\n' makes one)")
        else:
            users[name] = h.encode()
    t.close()
    return users

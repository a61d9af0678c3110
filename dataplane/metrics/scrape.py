"""Reading a /metrics endpoint from outside the run, as `dataplane top` does: one GET over HTTP
or HTTPS (a CA to check the server with, a client certificate, basic auth), the text parsed by
prometheus_client's own parser into {(name, labels): value}.

Nothing here touches shared memory or needs root: whoever can reach the endpoint can read it,
which is what lets `top` watch a run started by `up` or systemd.
"""

from __future__ import annotations

import base64
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL = "http://127.0.0.1:9477/metrics"   # [metrics] listen of the shipped configs

Labels = tuple[tuple[str, str], ...]


class ScrapeError(RuntimeError):
    """The endpoint could not be read: the message says what and what to try."""


@dataclass
class Endpoint:
    """Where the metrics are and how to prove who we are to them."""
    url: str = DEFAULT_URL
    ca: Path | None = None            # verify the server's certificate against this CA
    cert: Path | None = None          # client certificate (RequireAndVerifyClientCert)
    key: Path | None = None
    user: str | None = None           # basic auth
    password: str | None = None
    timeout: float = 5.0

    def context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def get(self) -> str:
        """The exposition text, or a ScrapeError that names the URL and the likely cause."""
        req = urllib.request.Request(self.url)
        if self.user is not None:
            token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context()) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            hint = ("; give --user and the password (DATAPLANE_METRICS_PASSWORD or "
                    "--password-file)" if e.code == 401 else "")
            raise ScrapeError(f"{self.url}: HTTP {e.code} {e.reason}{hint}") from None
        except urllib.error.URLError as e:
            raise ScrapeError(self._why(e.reason)) from None
        except (OSError, ssl.SSLError) as e:     # a reset or a timeout after the connect
            raise ScrapeError(self._why(e)) from None

    def _why(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return (f"no dataplane metrics at {self.url}: connection refused; is it running? "
                    "(dataplane status)")
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"{self.url}: {reason.verify_message}: give the CA that signed it (--ca)"
        if isinstance(reason, ssl.SSLError):
            return f"{self.url}: TLS failed ({reason}): is it https, does it want --cert/--key?"
        if isinstance(reason, TimeoutError):
            return f"{self.url}: no answer within {self.timeout:g} s"
        return f"no dataplane metrics at {self.url}: {reason}"


def add_endpoint_args(p, url_help: str) -> None:
    """The flags that say how to reach an endpoint: `top` and `flows` take the same."""
    p.add_argument("--url", default=None, help=url_help)
    p.add_argument("--ca", type=Path, metavar="FILE",
                   help="https: verify the server against this CA (default: the system's)")
    p.add_argument("--cert", type=Path, metavar="FILE", help="https: client certificate")
    p.add_argument("--key", type=Path, metavar="FILE", help="https: its private key")
    p.add_argument("--user", help="basic auth user; the password comes from the environment "
                   "variable DATAPLANE_METRICS_PASSWORD or --password-file")
    p.add_argument("--password-file", metavar="FILE", help="basic auth password (first line)")


def endpoint_of(args, url: str) -> Endpoint:
    """The Endpoint the flags of add_endpoint_args name, at `url`; ValueError for a usage
    mistake (a certificate without its key, a user without a password)."""
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together (the client certificate and its key)")
    password = None
    if args.user is not None:
        password = (Path(args.password_file).read_text().rstrip("\n") if args.password_file
                    else os.environ.get("DATAPLANE_METRICS_PASSWORD"))
        if password is None:
            raise ValueError("--user needs a password: DATAPLANE_METRICS_PASSWORD or "
                             "--password-file")
    return Endpoint(url, ca=args.ca, cert=args.cert, key=args.key, user=args.user,
                    password=password)


@dataclass
class Scrape:
    """One scrape: every sample by (name, sorted labels), and when it was taken."""
    at: float
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        s = cls(at)
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                s.samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
        return s

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)

    def each(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        """(labels, value) of every sample called `name`."""
        for (n, labels), v in self.samples.items():
            if n == name:
                yield dict(labels), v

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Samples of `name` summed by the values of the label `keys` (the rest summed over)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, v in self.each(name):
            k = tuple(labels.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + v
        return out

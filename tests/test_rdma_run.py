"""RDMA transports in a run: the [[transport]] kind = "rdma" tables, the process that runs each
end (dataplane/transport/rdma/process.py), its counters in the control file, the scrape and
`dataplane status`.

The config checks run here; the rest needs RDMA, so one guest (scripts/guest --rdma) runs
tests/guest/rdma_run_checks.py: `dataplane run` of the default lab on the uring backend with
its rx ring shipped over rxe0 to a receiver of the same run, status and a scrape while it runs,
the receiver SIGKILLed and restarted by the run, and a missing device refused at start.
"""

from __future__ import annotations

import re

import pytest

from dataplane import config
from dataplane.config.loader import ConfigError
from scripts.guest_run import GuestRun
from tests.helpers.default_lab import DEFAULT

SEND = '''
[[transport]]
name = "ship"
kind = "rdma"
role = "send"
from = "rx.in"
peer = "10.9.9.1:18515"
key_file = "/etc/dataplane/link.key"
'''
RECV = '''
[[transport]]
name = "col"
kind = "rdma"
role = "recv"
listen = "10.9.9.1:18515"
key_file = "/etc/dataplane/link.key"
'''


def load(extra: str) -> config.Config:
    return config.loads(DEFAULT.read_text() + extra, source="t.toml")


def test_rdma_transport_tables() -> None:
    cfg = load(SEND + 'device = "mlx5_0"\n' + RECV)
    send, recv = cfg.transports
    assert (send.kind, send.mode, send.device, send.worker, send.port, send.host,
            send.tcp_port) == ("rdma", "rdma", "mlx5_0", "rx", "in", "10.9.9.1", 18515)
    assert (recv.kind, recv.mode, recv.device, recv.label) == ("rdma", "rdma", "rxe0", "col")


@pytest.mark.parametrize("extra,want", [
    (SEND + 'mode = "zerocopy"\n', ['transport[0].mode = "zerocopy"', 'only with kind = "tcp"']),
    (SEND.replace('"rdma"', '"infiniband"'),
     ['transport[0].kind = "infiniband"', "expected one of tcp, rdma"]),
    (SEND.replace('kind = "rdma"\n', "") + 'device = "rxe0"\n',
     ['transport[0].device = "rxe0"', 'only with kind = "rdma"']),
    (RECV + 'device = "rxe 0"\n', ['transport[0].device = "rxe 0"']),
])
def test_rdma_transport_errors_name_the_key(extra: str, want: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load(extra)
    for w in want:
        assert w in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def guest(guest_lab) -> GuestRun:
    return guest_lab.checks("rdma_run_checks.py", flags=("--rdma",))


def test_run_ships_a_ring_over_rdma(guest):
    d = guest.ok("run_with_rdma_transport")
    print(d["output"])
    m = d["metrics"]
    assert m["qps"] == 2 and m["max_qp"] > 0, m
    assert m["mr_misses"] >= 1 and m["mr_registered"] > 0 and m["from_rx"] > 0, m
    # status while running: both ends, their QP, credits and cache figures
    for line in ("transport ship (rdma send to 10.9.9.1:18515): state=running",
                 "transport col (rdma recv on 10.9.9.1:18515): state=running",
                 "rdma rxe0: QPs 1/", "credits ", "MR cache "):
        assert line in d["status"], d["status"]
    # the receiver was killed: the run restarted it, the sender reconnected
    assert "restarts 1" in d["status_after_kill"], d["status_after_kill"]
    assert "transport col exited -9" in d["output"]
    # every generated sequence number arrived (duplicates allowed: at-least-once) or was lost
    # in a way some counter saw: the run's own books, exit 0
    assert d["rc"] == 0, d["output"]
    got = re.search(r"sent (\d+), received (\d+) unique \((\d+) duplicates\), missing (\d+)",
                    d["output"])
    assert got and int(got.group(2)) > 1000, d["output"]
    # back on the same ring, the sender resent nothing the receiver had published: no
    # duplicates; what the killed receiver never published is the sender's lost count
    assert int(got.group(3)) == 0, d["output"]
    assert "PROBLEM" not in d["output"], d["output"]


def test_missing_rdma_device_is_refused_at_start(guest):
    d = guest.ok("missing_device")
    assert d["rc"] == 1, d["output"]
    assert "RDMA device 'rxe9' not found; devices here: rxe0" in d["output"], d["output"]

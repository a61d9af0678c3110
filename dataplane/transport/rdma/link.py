"""What both ends of the RDMA transport (dataplane/transport/rdma/receiver.py,
dataplane/transport/rdma/sender.py) share: the
errors, the RC queue pair and its completion queue, the QP budget of a device, and the JSON
lines of the TCP exchange.  The protocol itself is described in
dataplane/transport/rdma/receiver.py."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any

# After the JSON exchange, the TCP socket carries fixed-size messages (kind, value):
#   CREDIT   receiver -> sender: the receiver's consumer index (the sender may write below
#            cons + ring_size);
#   END      sender -> receiver: the stream ends; value is the remote ring position after the
#            sender's last batch, every batch of which it has seen completed;
#   END_ACK  receiver -> sender: value is the receiver's prod once it has published up to END's
#            position; both then close the connection, which neither counts as an error.
# Without END, a receiver that stops once it has the last packet closes the socket while the
# sender may still be waiting for its last completion, and the sender counts a peer error.
MSG = struct.Struct("<B7xQ")
CREDIT, END, END_ACK = 1, 2, 3
MAX_BATCH = 64


class RdmaError(Exception):
    """A broken connection: WC error, failed post, peer gone, timeout; or no QP left."""


class WCError(RdmaError):
    """A work completion with an error status (the QP is in the error state now)."""


def verbs() -> Any:
    """pyverbs.enums, imported only when a transport starts: the module loads without RDMA."""
    import pyverbs.enums as e
    return e


def gid_index(ctx: Any) -> int:
    """The first IPv4-mapped GID (RoCEv2), else 0."""
    port = ctx.query_port(1)
    for i in range(port.gid_tbl_len):
        try:
            g = str(ctx.query_gid(1, i))
        except Exception:   # noqa: BLE001,S112 - holes in the table
            continue
        if g == "0000:0000:0000:0000:0000:0000:0000:0000":
            break
        if g.startswith("0000:0000:0000:0000:0000:ffff"):
            return i
    return 0


# QPs this process holds per device.  The device's max_qp bounds the whole device; verbs does
# not tell how many QPs other processes hold, so this counts ours (as the MR cache counts its
# own MRs against max_mr) and refuses the one past the limit with a message instead of
# whatever ibv_create_qp would fail with.
_qps: dict[str, int] = {}
_qps_lock = threading.Lock()


def take_qp(device: str, max_qp: int) -> None:
    with _qps_lock:
        n = _qps.get(device, 0)
        if n >= max_qp:
            raise RdmaError(f"{device}: max_qp is {max_qp} and this process holds {n} QPs on "
                            f"it: refusing to create QP number {n + 1}")
        _qps[device] = n + 1


def give_qp(device: str) -> None:
    with _qps_lock:
        _qps[device] -= 1


def qps_held(device: str) -> int:
    return _qps.get(device, 0)


class Link:
    """One RC QP and its CQ in a device context (sq_depth send WRs, rq_depth receive WRs)."""

    def __init__(self, ctx: Any, pd: Any, device: str, sq_depth: int, rq_depth: int,
                 remote_write: bool) -> None:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        e = verbs()
        self.e = e
        self.device = device
        take_qp(device, int(ctx.query_device().max_qp))
        self._held = True
        self.cq = self.qp = None
        try:
            self.gidx = gid_index(ctx)
            self.gid = ctx.query_gid(1, self.gidx)
            # one CQ for both queues: every send WR may be signaled, every receive completes
            self.cq = CQ(ctx, sq_depth + rq_depth)
            cap = QPCap(max_send_wr=sq_depth, max_recv_wr=rq_depth, max_send_sge=1,
                        max_recv_sge=1)
            # sq_sig_all=0 (pyverbs' default is 1): only the WRs that ask for it complete
            self.qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                        cap=cap, sq_sig_all=0))
            a = QPAttr(qp_state=e.IBV_QPS_INIT)
            # only a receiver's QP takes RDMA WRITEs; a sender's refuses any remote access
            a.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | \
                (e.IBV_ACCESS_REMOTE_WRITE if remote_write else 0)
            a.port_num, a.pkey_index = 1, 0
            self.qp.to_init(a)
        except BaseException:
            self.close()
            raise

    def info(self) -> dict[str, Any]:
        return {"qpn": self.qp.qp_num, "gid": str(self.gid)}

    def connect(self, remote: dict[str, Any]) -> None:
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr
        e = self.e
        a = QPAttr(qp_state=e.IBV_QPS_RTR)
        a.path_mtu, a.dest_qp_num, a.rq_psn = e.IBV_MTU_1024, remote["qpn"], 0
        a.max_dest_rd_atomic, a.min_rnr_timer = 1, 12
        try:
            dgid = GID(remote["gid"])
        except Exception as err:   # noqa: BLE001 - pyverbs' own errors for a bad GID
            raise RdmaError(f"peer GID {remote['gid']!r}: {err}") from None
        a.ah_attr = AHAttr(gr=GlobalRoute(dgid=dgid, sgid_index=self.gidx), is_global=1,
                           port_num=1)
        self.qp.to_rtr(a)
        # ACK timeout 4.096 us * 2^16 = 268 ms, 6 retries: a peer is declared lost after ~2 s.
        # 12 (17 ms) x 3 gave false IBV_WC_RETRY_EXC_ERR on a healthy emulated link, whose ACKs
        # take longer than 17 ms; 14 (67 ms) and 15 (134 ms) x 6 still did now and then with
        # both emulated hosts short of CPU; retry_cnt 7 is "retry forever" on rxe, so a
        # vanished peer would never show as a work completion
        a.qp_state, a.sq_psn, a.timeout, a.retry_cnt, a.rnr_retry = e.IBV_QPS_RTS, 0, 16, 6, 7
        a.max_rd_atomic = 1
        self.qp.to_rts(a)

    def close(self) -> None:
        for x in (self.qp, self.cq):
            try:
                if x is not None:
                    x.close()
            except Exception:   # noqa: BLE001,S110 - best effort on a broken link
                pass
        if self._held:
            self._held = False
            give_qp(self.device)


def split_msgs(buf: bytes) -> tuple[list[tuple[int, int]], bytes]:
    """The whole messages at the start of `buf` as (kind, value), and the bytes left over."""
    k = len(buf) // MSG.size * MSG.size
    return [m for m in MSG.iter_unpack(buf[:k])], buf[k:]


# The set-up exchange after the handshake (dataplane/transport/auth.py): JSON objects, each
# behind its length (u32), at most JSON_MAX bytes, read with one deadline: a peer cannot make us
# buffer more or wait longer, and nothing is read past the object (the fixed-size messages
# follow on the same socket).
JSON_LEN = struct.Struct("<I")
JSON_MAX = 4096


def send_json(sock: socket.socket, obj: dict[str, Any], timeout: float = 10.0) -> None:
    from dataplane.transport.auth import AuthError, send_all
    body = json.dumps(obj, separators=(",", ":")).encode()
    try:
        send_all(sock, JSON_LEN.pack(len(body)) + body, time.monotonic() + timeout)
    except AuthError as e:
        raise RdmaError(f"sending the set-up: {e}") from None


def recv_json(sock: socket.socket, timeout: float, schema: dict[str, type]) -> dict[str, Any]:
    """One JSON object of the set-up, with every key of `schema` there and of its type (ints
    0 <= v < 2**64, strings printable and short): RdmaError otherwise, never a KeyError."""
    from dataplane.transport.auth import AuthError, recv_exact
    deadline = time.monotonic() + timeout
    try:
        (n,) = JSON_LEN.unpack(recv_exact(sock, JSON_LEN.size, deadline))
        if n > JSON_MAX:
            raise RdmaError(f"set-up message of {n} bytes (at most {JSON_MAX})")
        obj = json.loads(recv_exact(sock, n, deadline))
    except AuthError as e:
        raise RdmaError(f"during the set-up: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RdmaError(f"set-up message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RdmaError("set-up message is not a JSON object")
    for k, kind in schema.items():
        v = obj.get(k)
        if kind is int:
            ok = type(v) is int and 0 <= v < 1 << 64
        elif kind is str:
            ok = isinstance(v, str) and len(v) <= 128 and v.isprintable()
        else:
            ok = isinstance(v, kind)
        if not ok:
            raise RdmaError(f"set-up message: {k} = {json.dumps(v)[:40]}: expected "
                            f"{kind.__name__}" + (" in [0, 2**64)" if kind is int else ""))
    return obj


# what each side says in the set-up (the receiver's greeting: dataplane/transport/rdma/receiver.py)
QP_INFO = {"qpn": int, "gid": str}
GREETING = {**QP_INFO, "slot_rkey": int, "slot_addr": int, "stage_rkey": int, "stage_addr": int,
            "ring_size": int, "slot_size": int, "prod": int, "cons": int, "ring_id": str}
MAX_REMOTE_RING = 1 << 20      # a sender keeps state per remote position: bounded
MAX_REMOTE_SLOT = 1 << 20

"""The RDMA RC transport through pyverbs: link.py (the QP and what both ends share), receiver.py
(the protocol and the receiving end), sender.py and wrs.py (its work requests), process.py (an
end as a process of a run), and mr_cache.py (the memory-registration cache both ends use).
pyverbs is imported only when an end starts: this package loads on a host without RDMA."""

from dataplane.transport.rdma.link import MAX_BATCH, MSG, RdmaError, WCError, gid_index
from dataplane.transport.rdma.receiver import RdmaReceiver
from dataplane.transport.rdma.sender import RdmaSender

__all__ = ["MAX_BATCH", "MSG", "RdmaError", "RdmaReceiver", "RdmaSender", "WCError", "gid_index"]

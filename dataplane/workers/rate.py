"""A running generator stream's rate, changed in place: Python writes the stream's rate_pps in
the arena (struct dp_gen_stream_ctl, the one word of it Python writes) and the worker takes it
at its next periodic tick (~10 ms), keeping the stream's sequence space, so the receiver's books
stay exact across the change.  `dataplane rate` and `dataplane bench` call this.
"""

from __future__ import annotations

from dataplane.config.streams import MAX_RATE_PPS
from dataplane.shm.arena import Arena
from dataplane.shm.layout import GEN_STREAM_FIELDS

_RATE, _STREAM = GEN_STREAM_FIELDS.index("rate_pps"), GEN_STREAM_FIELDS.index("stream")


def stream_ids(arena: Arena) -> list[int]:
    """The stream ids the arena's generator has set up, in config order."""
    return [int(s) for s in arena.gen_streams[:, _STREAM] if s]


def rate(arena: Arena, stream: int) -> int:
    """The stream's rate now, packets/s (0: as fast as the port takes them)."""
    return int(arena.gen_streams[_row(arena, stream), _RATE])


def set_rate(arena: Arena, stream: int, pps: int) -> int:
    """Give stream `stream` of the arena's generator a new rate (packets/s, 0: as fast as the
    port takes them); returns the rate it had.  The worker takes it within one tick."""
    if not 0 <= pps <= MAX_RATE_PPS:
        raise ValueError(f"rate {pps} packets/s: expected 0..{MAX_RATE_PPS}")
    row = _row(arena, stream)
    old = int(arena.gen_streams[row, _RATE])
    arena.gen_streams[row, _RATE] = pps      # one aligned 8-byte store: the worker reads it whole
    return old


def _row(arena: Arena, stream: int) -> int:
    ids = [int(s) for s in arena.gen_streams[:, _STREAM]]
    if stream not in ids or stream == 0:
        have = ", ".join(map(str, stream_ids(arena))) or "none: no generator has started there"
        raise ValueError(f"{arena.path}: no generator stream {stream} (streams: {have})")
    return ids.index(stream)


def generator_streams(arena: Arena) -> list[dict[str, int | bool]]:
    """What `status` shows of each generator stream: its rate now, frames sent and dropped,
    and how many carried a trailer (sequence-tracked); `tracked` is False for a stream that
    sends without trailers (a capture without room for them)."""
    out = []
    for row in arena.gen_streams.copy():
        d = dict(zip(GEN_STREAM_FIELDS, (int(v) for v in row), strict=False))
        if d["stream"]:
            out.append({"stream": d["stream"], "rate_pps": d["rate_pps"],
                        "tx_packets": d["tx_packets"], "tx_bytes": d["tx_bytes"],
                        "tx_drops": d["tx_drops"], "issued": d["issued"],
                        "with_trailer": d["seq"], "tracked": d["seq"] > 0 or d["issued"] == 0})
    return out

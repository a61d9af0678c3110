"""The TCP receiver's frame check (dp_tw_check in native/transport/transport_common.c, the
header and descriptor validation every received frame goes through) fuzzed as the pure
function it is: hypothesis for the structure of near-valid frames, then a time-bounded loop of
valid frames with random bytes changed.  It must never crash and must accept exactly the
frames the rules of native/include/dp_transport.h allow, restated here independently.  The
handshake parser is fuzzed in tests/test_auth.py."""

from __future__ import annotations

import time

import numpy as np
from dataplane._native import ffi, lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import rogue

RING, SLOT = 4096, 2048
FRAME_SIZE = ffi.sizeof("struct dp_tw_frame")


def frame_is_valid(magic: int, version: int, header_len: int, count: int, payload_len: int,
                   lens: list[int] | None) -> bool:
    """The rules of native/include/dp_transport.h, restated independently of the C code."""
    if (magic, version, header_len) != (lib.DP_TW_MAGIC, lib.DP_TW_VERSION, FRAME_SIZE):
        return False
    if not 1 <= count <= min(lib.DP_TW_MAX_BATCH, RING) or payload_len > count * SLOT:
        return False
    return lens is None or (all(n <= SLOT for n in lens) and sum(lens) == payload_len)


def check(magic: int, version: int, header_len: int, count: int, payload_len: int,
          lens: list[int] | None) -> tuple[int, str]:
    h = ffi.new("struct dp_tw_frame *")
    h.magic, h.version, h.header_len, h.count, h.payload_len = \
        magic, version, header_len, count, payload_len
    h.batch_seq, h.session = 2**64 - 1, 2**64 - 1
    d = ffi.NULL
    if lens is not None:
        # the receiver reads count descriptors (count checked first): here, as many as given
        d = ffi.new("struct dp_desc[]", max(len(lens), count if count <= 1024 else 0, 1))
        for i, n in enumerate(lens):
            d[i].len = n
    why = ffi.new("char[]", 256)
    rc = lib.dp_tw_check(h, d, RING, SLOT, why, 256)
    return rc, ffi.string(why).decode()


U16, U32 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)


@st.composite
def frames(draw) -> tuple[int, int, int, int, int, list[int] | None]:
    """Mostly near-valid frames (so the descriptor rules get exercised), some random ones."""
    lens = draw(st.lists(st.one_of(st.integers(0, SLOT), st.integers(SLOT, 2**16 - 1)),
                         min_size=1, max_size=1100))
    valid_sum = sum(lens)
    magic = draw(st.one_of(st.just(int(lib.DP_TW_MAGIC)), U32))
    version = draw(st.one_of(st.just(int(lib.DP_TW_VERSION)), U16))
    header_len = draw(st.one_of(st.just(FRAME_SIZE), U16))
    count = draw(st.one_of(st.just(len(lens)), U32, st.integers(0, 1100)))
    payload_len = draw(st.one_of(st.just(valid_sum & 0xFFFFFFFF), U32,
                                 st.integers(0, 2 * SLOT)))
    if count > len(lens) and count <= 1024:
        lens = lens + [0] * (count - len(lens))     # the bytes a receiver would read
    lens = lens[:count] if count <= 1024 else lens
    return magic, version, header_len, count, payload_len, draw(st.one_of(st.just(lens),
                                                                          st.none()))


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames())
def test_fuzz_frame_check(f: tuple[int, int, int, int, int, list[int] | None]) -> None:
    """dp_tw_check never crashes, accepts exactly the valid frames, and says why it refuses."""
    magic, version, header_len, count, payload_len, lens = f
    if lens is not None and count > 1024:
        lens = None       # the receiver never reads the descriptors of a refused header
    rc, why = check(magic, version, header_len, count, payload_len, lens)
    assert rc == (0 if frame_is_valid(*f[:5], lens) else -1), (f[:5], why)
    assert (rc == 0) == (why == ""), why


def test_fuzz_frame_check_mutations() -> None:
    """Valid frames with random bytes changed, for a bounded time: same rules, no crash."""
    rng = np.random.default_rng(7)
    deadline = time.monotonic() + 10
    n = accepted = 0
    while time.monotonic() < deadline:
        k = int(rng.integers(1, 65))
        lens = [int(x) for x in rng.integers(0, SLOT + 1, k)]
        raw = bytearray(rogue.header(k, sum(lens), 1, 1))
        for _ in range(int(rng.integers(0, 4))):
            raw[int(rng.integers(0, FRAME_SIZE))] = int(rng.integers(0, 256))
        h = ffi.from_buffer("struct dp_tw_frame *", raw)
        if rng.random() < 0.3:
            lens[int(rng.integers(0, k))] = int(rng.integers(0, 2**16))
        count = h.count if h.count <= 1024 else 0
        lens = (lens + [0] * count)[:count] if count else None
        rc, why = check(h.magic, h.version, h.header_len, h.count, h.payload_len, lens)
        want = frame_is_valid(h.magic, h.version, h.header_len, h.count, h.payload_len, lens)
        assert rc == (0 if want else -1), why
        n += 1
        accepted += want
    assert n > 1000 and 0 < accepted < n      # both sides of the rules were exercised

"""A memory-registration cache in front of ibv_reg_mr (pyverbs `MR(pd, length, access,
address=...)`) for buffers the user hands in: numpy arrays, bytearrays, mmaps, an arena.

    with MRCache(ctx, pd) as cache:
        reg = cache.get(buf, offset=0, length=None)    # Registration(lkey, rkey, addr, length)
        sge = SGE(reg.addr, reg.length, reg.lkey)
        with cache.pin(buf, 4096, 512) as reg:         # not evictable while WRs are in flight
            ...

`get(buffer, offset, length)`: keys and address of bytes [offset, offset+length) of `buffer`
(length None: to its end).  A miss registers the WHOLE exported buffer when it fits the budget
(any sub-range of it is then a hit), else, or with `exact=True`, only the asked range: what a
peer may write is registered to the byte (the RDMA receiver's slots; the MR's range is all rxe
checks).  Access: local write only unless `access` asks for more (least privilege).

No stale registration, by design (the bug libfabric and UCX caches had: a buffer freed, another
mapped at its address, the old MR used):
  - each entry holds a memoryview of the caller's object: while registered, the memory cannot be
    freed or unmapped (mmap.close() raises BufferError, a numpy array / bytearray stays alive);
    evict(), release() and close() drop that export with the MR (deregistered first);
  - entries are keyed by (address, length, id of the exporting object), and the entry keeps the
    object alive, so its id cannot be reused: a different object at the same address is a miss.
Read-only buffers (bytes) are refused.

The budget: pinned bytes (page-rounded, as RLIMIT_MEMLOCK counts) stay within min(`budget`,
the soft RLIMIT_MEMLOCK), or `default_budget` when unlimited; LRU unpinned entries are evicted
to make room.  The limit is read at each miss: a region that cannot fit raises MemlockError
naming RLIMIT_MEMLOCK, its value and the value needed, before ibv_reg_mr.  With CAP_IPC_LOCK
(not held to the limit, by the kernel either) the budget is `budget` or `default_budget`.
Entries stay below the device's max_mr (and `max_entries`).

Thread-safe: one lock around the index; ibv_reg_mr runs outside it, the bytes reserved first;
of two threads registering one range at once, the loser uses the winner's MR (`races`).  Keys
stay valid until the entry is evicted: use pin() around posted WRs.  The hit on a registered
object (the same arena or array again) takes no lock and, for the whole object, allocates
nothing: a dict lookup by id(), an identity check, one stamp from a clock, the Registration
built with the entry.  Recency is that stamp (the LRU victim is the smallest, found at
eviction, which a registration pays for anyway); the hit count is the clock's stamps less those
taken under the lock by anything else, exact without a lock: next() on an itertools.count is
one atomic step under the GIL.

One module over 400 lines: the index, the budget and the lock-free hit share invariants (what
is linked where, what a stamp counts) that one reader should see together.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Any, NamedTuple

PAGE = mmap.PAGESIZE
DEFAULT_BUDGET = 1 << 30        # when RLIMIT_MEMLOCK is unlimited
# registration-time histogram: upper bounds in seconds (the last bucket is +Inf)
SECONDS_BUCKETS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, float("inf"))


class MRCacheError(Exception):
    """A buffer the cache cannot register (read-only, non-contiguous, out of range, no room)."""


class MemlockError(MRCacheError):
    """RLIMIT_MEMLOCK is too low for a registration (raised before ibv_reg_mr)."""


class Registration(NamedTuple):
    lkey: int
    rkey: int
    addr: int       # address of the asked byte range (not of the registered region)
    length: int


def _default_access() -> int:
    import pyverbs.enums as e
    return e.IBV_ACCESS_LOCAL_WRITE


def _pyverbs_register(pd: Any, length: int, access: int, address: int) -> Any:
    from pyverbs.mr import MR
    return MR(pd, length, access, address=address)


def _span(addr: int, length: int) -> int:
    """Bytes pinned for [addr, addr+length): whole pages."""
    start = addr & ~(PAGE - 1)
    end = (addr + length + PAGE - 1) & ~(PAGE - 1)
    return end - start


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes; None when unlimited, or when this process has
    CAP_IPC_LOCK: the kernel lets it pin past the limit (ib_umem_get checks
    capable(CAP_IPC_LOCK)), so refusing there would refuse what would work."""
    from dataplane.host.proc import CAP_IPC_LOCK, has_cap
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY or has_cap(CAP_IPC_LOCK) else soft


@dataclass(eq=False, slots=True)
class _Entry:
    key: tuple[int, int, int]           # (addr, length, id(obj))
    view: memoryview                    # the export: holds the caller's memory
    mr: Any
    pinned: int
    used: int                           # the clock's stamp at the last use (LRU order)
    pins: int = 0
    lkey: int = field(init=False)       # read once: a pyverbs property costs a call per hit
    rkey: int = field(init=False)
    obj: Any = field(init=False)        # the exporting object, for the hit's identity check
    addr: int = field(init=False)       # plain fields, not properties of key: a hit reads them
    length: int = field(init=False)
    reg: Registration = field(init=False)   # the whole region's, returned as is by a hit

    def __post_init__(self) -> None:
        self.lkey, self.rkey, self.obj = self.mr.lkey, self.mr.rkey, self.view.obj
        self.addr, self.length = self.key[0], self.key[1]
        self.reg = Registration(self.lkey, self.rkey, self.addr, self.length)

    def covers(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


# a Registration without NamedTuple's Python-level __new__ (a hit's cost under emulation)
_registration = partial(tuple.__new__, Registration)
_lru_order = attrgetter("used")


@dataclass
class _Stats:
    misses: int = 0
    evictions: int = 0
    races: int = 0
    registered_bytes: int = 0
    pinned_bytes: int = 0
    seconds_sum: float = 0.0
    seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(SECONDS_BUCKETS))


def _bytes_of(buffer: Any, offset: int, length: int | None) -> tuple[memoryview, int, int]:
    """The buffer as a flat, writable byte view, its address, and the asked range's length
    (the rest of the buffer when None); MRCacheError when it cannot be registered so."""
    view = memoryview(buffer)
    if view.readonly:
        view.release()
        raise MRCacheError("read-only buffer: the MR needs local write access")
    if not view.c_contiguous:
        view.release()
        raise MRCacheError("buffer is not C-contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    size = view.nbytes
    if length is None:
        length = size - offset
    if offset < 0 or length <= 0 or offset + length > size:
        raise MRCacheError(f"range [{offset}, {offset + length}) outside a buffer of "
                           f"{size} bytes")
    anchor = ctypes.c_char.from_buffer(view)
    base = ctypes.addressof(anchor)
    del anchor
    return view, base, length


class MRCache:
    """An LRU cache of memory registrations in one protection domain; close() is idempotent."""

    def __init__(self, ctx: Any, pd: Any, *, access: int | None = None, exact: bool = False,
                 budget: int | None = None, default_budget: int = DEFAULT_BUDGET,
                 max_entries: int | None = None,
                 register: Callable[[Any, int, int, int], Any] | None = None) -> None:
        self.pd = pd
        self.access = _default_access() if access is None else access
        self.exact = exact
        limit = memlock_limit()
        base = default_budget if limit is None else limit
        self.budget = base if budget is None else min(budget, base)
        self.max_mr = int(ctx.query_device().max_mr) if ctx is not None else None
        caps = [c for c in (self.max_mr, max_entries) if c is not None]
        self.max_entries = min(caps) if caps else None
        self._register = register or _pyverbs_register
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._lru: dict[tuple[int, int, int], _Entry] = {}
        self._tick = itertools.count().__next__     # LRU stamps; hits counted from them too
        self._other_ticks = 0           # stamps taken under the lock, not by a hit
        self._by_obj: dict[int, list[_Entry]] = {}
        # id(buffer) -> the entry that registered ALL of that very object: the hit path without
        # a memoryview and ctypes (most of a hit's cost).  Safe for the same reasons as _by_obj:
        # the entry's export keeps the object alive (its id is not reused) and its memory in
        # place (a bytearray, mmap or numpy array with an export cannot be resized).
        self._whole: dict[int, _Entry] = {}
        self._reserved = 0              # bytes and entries being registered outside the lock
        self._reserved_entries = 0
        self._s = _Stats()
        self._closed = False

    # ---- the API ----

    def get(self, buffer: Any, offset: int = 0, length: int | None = None) -> Registration:
        """Keys and address of bytes [offset, offset+length) of buffer; registers on a miss."""
        # No lock: an entry unlinked (evicted, released) after this lookup gives keys that die
        # with it, exactly as it would had it been evicted just after a locked lookup returned.
        e = self._whole.get(id(buffer))
        if e is not None and e.obj is buffer:
            if offset == 0 and length is None:
                e.used = self._tick()
                return e.reg
            if length is None:
                length = e.length - offset
            if offset >= 0 and length > 0 and offset + length <= e.length:
                e.used = self._tick()
                return _registration((e.lkey, e.rkey, e.addr + offset, length))
        reg, _ = self._get(buffer, offset, length, pin=False)
        return reg

    @contextmanager
    def pin(self, buffer: Any, offset: int = 0, length: int | None = None
            ) -> Iterator[Registration]:
        """get(), with the entry kept from eviction until the block ends."""
        reg, entry = self._get(buffer, offset, length, pin=True)
        try:
            yield reg
        finally:
            with self._lock:
                entry.pins -= 1
                self._room.notify_all()

    def release(self, buffer: Any) -> int:
        """Deregister every entry of this object (pinned ones too: the caller says it is done)
        and drop their exports, so the object can be freed; returns how many."""
        obj = memoryview(buffer).obj
        with self._lock:
            gone = list(self._by_obj.get(id(obj), ()))
            for e in gone:
                self._unlink(e)
        for e in gone:
            self._drop(e)
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            gone = list(self._lru.values())
            for e in gone:
                self._unlink(e)
        for e in gone:
            self._drop(e)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._s
            hits = self._stamp() + 1 - self._other_ticks    # every stamp taken so far, less
            return {"hits": hits, "misses": s.misses, "evictions": s.evictions,
                    "races": s.races, "entries": len(self._lru),
                    "registered_bytes": s.registered_bytes, "pinned_bytes": s.pinned_bytes,
                    "budget": self.budget, "max_entries": self.max_entries, "max_mr": self.max_mr,
                    "registration_seconds": {"sum": s.seconds_sum,
                                             "count": sum(s.seconds_buckets),
                                             "buckets": dict(zip(SECONDS_BUCKETS,
                                                                 s.seconds_buckets,
                                                                 strict=True))}}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.clear()

    def __enter__(self) -> MRCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._lru)

    # ---- inside ----

    def _get(self, buffer: Any, offset: int, length: int | None, pin: bool
             ) -> tuple[Registration, _Entry]:
        if self._closed:
            raise MRCacheError("the MR cache is closed")
        view, base, length = _bytes_of(buffer, offset, length)
        size, obj, want = view.nbytes, view.obj, base + offset
        with self._lock:
            while True:
                e = self._lookup(id(obj), want, length)
                if e is not None:
                    e.used = self._tick()
                    if pin:
                        e.pins += 1
                    return Registration(e.lkey, e.rkey, want, length), e
                # the whole object if it fits (and may be), else the asked range
                if not self.exact and _span(base, size) <= self.budget:
                    raddr, rlen = base, size
                else:
                    raddr, rlen = want, length
                pinned = _span(raddr, rlen)
                victims = self._make_room(pinned)
                if victims is not None:
                    break
                self._room.wait()       # room held by registrations in flight: wait for them
            self._s.misses += 1
            self._reserved += pinned
            self._reserved_entries += 1
        for v in victims:
            self._drop(v)
        t = time.perf_counter()
        try:
            mr = self._register(self.pd, rlen, self.access, raddr)
        except BaseException:
            with self._lock:
                self._reserved -= pinned
                self._reserved_entries -= 1
                self._room.notify_all()
            raise
        took = time.perf_counter() - t
        entry = _Entry((raddr, rlen, id(obj)), view, mr, pinned, 0)
        loser = None
        with self._lock:
            self._reserved -= pinned
            self._reserved_entries -= 1
            self._room.notify_all()
            self._record(took)
            e = self._lookup(id(obj), want, length)
            if e is not None:           # another thread registered it meanwhile: use theirs
                self._s.races += 1
                loser, entry = entry, e
            entry.used = self._stamp()
            if loser is None:
                self._lru[entry.key] = entry
                self._by_obj.setdefault(id(obj), []).append(entry)
                if raddr == base and rlen == size:
                    self._whole[id(obj)] = entry
                self._s.registered_bytes += rlen
                self._s.pinned_bytes += pinned
            if pin:
                entry.pins += 1
            reg = Registration(entry.lkey, entry.rkey, want, length)
        if loser is not None:
            self._drop(loser)
        return reg, entry

    def _lookup(self, oid: int, addr: int, length: int) -> _Entry | None:
        for e in self._by_obj.get(oid, ()):
            if e.covers(addr, length):
                return e
        return None

    def _make_room(self, pinned: int) -> list[_Entry] | None:
        """Under the lock: check the limit, unlink LRU victims until `pinned` more bytes and
        one more entry fit; raises before anything is registered; None when only registrations
        in flight (other threads') hold the room: wait for them and try again."""
        limit = memlock_limit()
        cap = self.budget if limit is None else min(self.budget, limit)
        if pinned > cap:
            if limit is not None and pinned > limit:
                raise MemlockError(
                    f"RLIMIT_MEMLOCK is {limit} bytes (soft limit); registering this buffer "
                    f"needs {pinned} bytes locked (RLIMIT_MEMLOCK >= {pinned}); raise it "
                    f"(ulimit -l, LimitMEMLOCK= in a systemd unit), or give the process "
                    f"CAP_IPC_LOCK, which pins past the limit")
            raise MRCacheError(f"a region of {pinned} bytes exceeds the MR cache budget of "
                               f"{cap} bytes")
        free_bytes = sum(e.pinned for e in self._lru.values() if e.pins == 0)
        free_entries = sum(1 for e in self._lru.values() if e.pins == 0)
        held = self._s.pinned_bytes - free_bytes + self._reserved + pinned
        held_n = len(self._lru) - free_entries + self._reserved_entries + 1
        if held > cap or (self.max_entries is not None and held_n > self.max_entries):
            if self._reserved_entries:
                return None
            used = self._s.pinned_bytes
            if limit is not None and cap == limit and held > cap:
                raise MemlockError(
                    f"RLIMIT_MEMLOCK is {limit} bytes (soft limit); {used} are registered "
                    f"and pinned, this buffer needs {pinned} more (RLIMIT_MEMLOCK >= "
                    f"{used + pinned})")
            raise MRCacheError(
                f"MR cache full: {len(self._lru)} entries ({used} bytes, budget {cap}, max "
                f"entries {self.max_entries}) are pinned; {pinned} bytes more do not fit")
        victims: list[_Entry] = []
        while (self._s.pinned_bytes + self._reserved + pinned > cap
               or (self.max_entries is not None
                   and len(self._lru) + self._reserved_entries + 1 > self.max_entries)):
            victim = min((e for e in self._lru.values() if e.pins == 0), key=_lru_order)
            self._unlink(victim)
            self._s.evictions += 1
            victims.append(victim)
        return victims

    def _unlink(self, e: _Entry) -> None:
        del self._lru[e.key]
        if self._whole.get(e.key[2]) is e:
            del self._whole[e.key[2]]
        lst = self._by_obj[e.key[2]]
        lst.remove(e)
        if not lst:
            del self._by_obj[e.key[2]]
        self._s.registered_bytes -= e.length
        self._s.pinned_bytes -= e.pinned

    def _stamp(self) -> int:
        """Under the lock: a stamp for anything but a hit (a new entry, a race, stats())."""
        self._other_ticks += 1
        return self._tick()

    @staticmethod
    def _drop(e: _Entry) -> None:
        """Outside the lock: deregister first, then let the memory go."""
        e.mr.close()
        e.view.release()

    def _record(self, seconds: float) -> None:
        self._s.seconds_sum += seconds
        for i, bound in enumerate(SECONDS_BUCKETS):
            if seconds <= bound:
                self._s.seconds_buckets[i] += 1
                break

"""The pieces of perf/rx_vs_testpmd.py: the rate-controlled generator, the two receivers under
test (testpmd rxonly, and the dataplane worker + Python consumer) and one trial of them.

A trial starts a fresh receiver, waits until it polls, then starts a fresh generator (the
project's DPDK worker with a [worker.generate] table: a token bucket, rate_pps, and `count`
packets, so the trial has an exact number to receive), waits until the generator has sent them
all, lets the receiver drain, stops both and reads their books.  It passes when nothing was lost
anywhere: the generator's port took every frame (tx_drops 0: on memif a full ring is the
receiver not keeping up), the receiver counted no drop (testpmd: RX-dropped, RX-nombufs;
dataplane: ring_full_drops, nic_missed, rx_nombuf) and received at least `count` frames.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rfc2544 import Trial  # perf/ is sys.path[0] when a perf script is run

from dataplane.config import templates
from dataplane.consumers.loop import ConsumerLoop, ring_sources
from dataplane.consumers.stats import TrafficStats
from dataplane.shm.arena import Arena
from dataplane.shm.layout import PORT_COUNTERS
from dataplane.workers.spec import GenSpec, PortSpec, WorkerSpec

REPO = Path(__file__).resolve().parent.parent
TESTPMD = "/usr/bin/dpdk-testpmd"
TAG = f"dpb{os.getpid()}"
BURST = 32       # testpmd's default RX burst; the worker and the generator get the same
RXD = 1024
FRAME = 66       # the smallest UDP frame that carries the generator's 24-byte trailer
SETTLE = 0.1     # s after the receiver says it polls before the count starts


class Lab:
    """Everything the run creates, undone in reverse order by close(), also after Ctrl-C."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._ids = 0

    def uid(self) -> int:
        self._ids += 1
        return self._ids

    def on_close(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def close(self) -> None:
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:   # one failed undo must not leave the rest behind
                print(f"cleanup: {type(e).__name__}: {e}", file=sys.stderr)


def stop_proc(p: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15) -> None:
    """Ask nicely (testpmd prints its final statistics on SIGINT), then kill."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def in_ns(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


@dataclass
class Where:
    """One section's wiring: the receiver's and the generator's port, their CPUs."""
    name: str
    rx_port: Callable[[int], PortSpec]    # uid -> the receiver's port (devargs are testpmd's too)
    gen_port: Callable[[int], PortSpec]   # uid -> the generator's port, same uid
    rx_ns: str | None
    gen_ns: str | None
    rx_cpu: int
    gen_cpu: int
    port_buffers: int = 0                 # frames the receiver's port holds (memif's ring)
    # memif: the generator (server) first, it sends once a client connects.  af_packet sends
    # at once, into a veth whose peer has no XDP socket yet: the receiver first there.
    gen_first: bool = True


def udp_frame() -> templates.Template:
    return templates.build(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02",
                           src="10.99.0.1", dst="10.99.0.2", proto="udp", sport=1000, dport=9,
                           size=FRAME, vary="sport")


def start_worker(lab: Lab, spec: WorkerSpec, netns: str | None) -> tuple[subprocess.Popen, Arena]:
    """A dataplane worker process on a fresh arena, once it polls (state "running")."""
    arena = Arena.create(Path(spec.arena_path), spec.geometry())
    lab.on_close(arena.unlink)
    lab.on_close(arena.close)
    proc = subprocess.Popen([*in_ns(netns), sys.executable, "-m", "dataplane.workers.process",
                             spec.to_json()], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    # the worker removes its EAL directory on a clean stop; this covers a killed one
    lab.on_close(lambda: shutil.rmtree(f"/var/run/dpdk/dp-{spec.name}-{proc.pid}",
                                       ignore_errors=True))
    lab.on_close(lambda: stop_proc(proc, signal.SIGTERM))
    deadline = time.monotonic() + 30
    while arena.worker_state() != "running":
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_proc(proc, signal.SIGTERM)
            raise RuntimeError(f"{spec.name} did not start (state {arena.worker_state()}): "
                               f"{arena.worker_error()} "
                               f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
        time.sleep(0.02)
    return proc, arena


def stop_worker(proc: subprocess.Popen, arena: Arena) -> None:
    """Stop it and free its arena at once: a section runs dozens of trials, and each dataplane
    arena holds a few hundred MB of /dev/shm once its pool and slots were touched."""
    arena.request_stop()
    stop_proc(proc, signal.SIGTERM, timeout=20)
    arena.close()
    arena.unlink()


class Generator:
    """The project's DPDK worker as a paced generator of `count` FRAME-byte UDP frames."""

    def __init__(self, lab: Lab, where: Where, uid: int, rate: float, count: int):
        t = udp_frame()
        spec = WorkerSpec(name=f"{TAG}g{uid}", worker_id=0, core=where.gen_cpu,
                          arena_path=f"/dev/shm/{TAG}-g{uid}", ring_size=1024, pool_mb=32,
                          n_mbufs=8191, burst=BURST, idle_sleep_us=0, eal_memory_mb=256,
                          log_level="error", ports=[where.gen_port(uid)],
                          gen=GenSpec(rate_pps=int(rate), burst=BURST, count=count,
                                      template=t.frame.hex(), vary_off=t.vary_off,
                                      vary_min=1000, vary_max=1999, csum=0))
        self.count = count
        self.proc, self.arena = start_worker(lab, spec, where.gen_ns)

    def port(self, name: str) -> int:
        return int(self.arena.port_counters[0][PORT_COUNTERS.index(name)])

    def taken(self) -> tuple[int, int]:
        """(frames the port took, frames it did not) so far."""
        return self.port("tx_packets"), self.port("tx_drops")

    def wait_taken(self, n: int, timeout: float) -> None:
        """Until the port took n frames (the link is up and the receiver gave it room)."""
        deadline = time.monotonic() + timeout
        while self.taken()[0] < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"generator sent nothing in {timeout:.0f} s "
                                   f"({self.arena.worker_error()})")
            time.sleep(0.002)

    def wait_sent(self, timeout: float) -> float:
        """Until every frame was taken, or timeout seconds (a generator slower than asked, or
        a receiver that takes little); returns the monotonic time it ended.  Polled every
        10 ms: a few ms of error over trials of seconds."""
        deadline = time.monotonic() + timeout
        # (s into the count, attempts refused) per 10 ms poll that saw some
        self.refusing: list[tuple[float, int]] = []
        t0, last = time.monotonic(), self.taken()[1]
        while True:
            tx, drops = self.taken()
            now = time.monotonic()
            if drops > last:
                self.refusing.append((round(now - t0, 3), drops - last))
                last = drops
            if tx >= self.count or now > deadline or self.proc.poll() is not None:
                return now
            time.sleep(0.01)

    def stop(self) -> None:
        stop_worker(self.proc, self.arena)


class TestpmdRx:
    """dpdk-testpmd --forward-mode=rxonly on one CPU (both its lcores), output read by a thread."""

    name = "testpmd"

    def __init__(self, lab: Lab, where: Where, uid: int, args) -> None:
        prefix = f"{TAG}-rx{uid}"
        lab.on_close(lambda: shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True))
        port = where.rx_port(uid)
        cpu = where.rx_cpu
        # taskset: EAL's control threads (memif socket, interrupts) stay on this CPU too
        cmd = [*in_ns(where.rx_ns), "taskset", "-c", str(cpu), "stdbuf", "-oL", TESTPMD,
               "--lcores", f"0@{cpu},1@{cpu}", "--no-huge", "-m", "512", "--no-pci",
               "--file-prefix", prefix, "--no-telemetry", "--vdev", port.devargs, "--",
               "--forward-mode=rxonly", "--total-num-mbufs", "32768", f"--burst={BURST}",
               f"--rxd={RXD}", f"--txd={RXD}", "--record-core-cycles", "--record-burst-stats",
               "--stats-period", "1"]   # without it testpmd reads stdin and exits at EOF
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        lab.on_close(lambda: stop_proc(self.proc))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 30
        # "<mode> packet forwarding - ports=..." comes once forwarding runs: it polls from then on
        while not any("packet forwarding - ports=" in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"testpmd did not start: {''.join(self.lines)[-2000:]}")
            time.sleep(0.02)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def begin(self) -> None:
        self.pre0 = preempted(self.proc.pid)

    def finish(self, count: int) -> dict:
        time.sleep(0.2)   # what is in flight lands
        pre = preempted(self.proc.pid) - self.pre0
        stop_proc(self.proc)
        self.reader.join(5)
        out = "".join(self.lines)
        # the port's block of the final forward statistics (the last one printed)
        block = out[out.rfind("Forward statistics for port"):]

        def num(pat: str, text: str = block) -> float:
            m = re.search(pat, text)
            return float(m[1]) if m else 0.0
        rx = int(num(r"RX-packets:\s*(\d+)"))
        drops = int(num(r"RX-dropped:\s*(\d+)") + num(r"RX-nombufs?:\s*(\d+)"))
        cyc = num(r"CPU cycles/packet=([\d.]+)", out)
        return {"received": rx, "rx_drops": drops, "preempted": pre, "busy_cycles_per_pkt": cyc,
                "worker_cycles_per_pkt": cyc, "path_cycles_per_pkt": cyc,
                "empty_poll_pct": num(r"RX-bursts : \d+ \[(\d+)% of 0 pkts", block)}


def preempted(pid: int) -> int:
    """Times the threads of pid were switched out while runnable (nonvoluntary_ctxt_switches):
    a busy poller's are the stalls that fill a ring while it idles in most polls."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:   # the thread ended meanwhile
            continue
        n += int(re.search(r"nonvoluntary_ctxt_switches:\s*(\d+)", status)[1])
    return n


def consumer_cpu_s(t: threading.Thread) -> float:
    """CPU seconds a thread has used so far (its own thread clock)."""
    assert t.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


class DataplaneRx:
    """`python -m dataplane.workers.process` (busy poll) and a ConsumerLoop thread of this
    process running TrafficStats on the same CPU, SCHED_FIFO so a waking consumer is not stuck
    behind the busy poll (as SCHED_OTHER it waits for the worker's time slice to end)."""

    name = "dataplane"

    def __init__(self, lab: Lab, where: Where, uid: int, args) -> None:
        spec = WorkerSpec(name=f"{TAG}w{uid}", worker_id=0, core=where.rx_cpu,
                          arena_path=f"/dev/shm/{TAG}-w{uid}", ring_size=args.ring_size,
                          n_mbufs=args.ring_size + 4 * RXD - 1,
                          pool_mb=args.ring_size // 256 + 32, burst=BURST, idle_sleep_us=0,
                          zero_copy=bool(args.zero_copy), copybreak=args.copybreak,
                          eal_memory_mb=256, log_level="error", ports=[where.rx_port(uid)])
        self.proc, self.arena = start_worker(lab, spec, where.rx_ns)
        self.stats = TrafficStats() if args.consumer == "stats" else None
        self.loop = ConsumerLoop(ring_sources([self.arena]), [self.stats] if self.stats else [],
                                 max_batch=args.ring_size)
        self.thread = threading.Thread(target=self._consume, args=(where.rx_cpu,),
                                       name="dp-consumer", daemon=True)
        self.thread.start()
        lab.on_close(self.loop.stop_event.set)
        self.ring = self.arena.rings[0]

    def _consume(self, cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})   # 0: this thread only
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        self.loop.run()

    def _drops(self) -> int:
        port = dict(zip(PORT_COUNTERS, (int(x) for x in self.arena.port_counters[0]),
                        strict=False))
        return self.ring.counter("ring_full_drops") + port["nic_missed"] + port["rx_nombuf"]

    def _snap(self) -> tuple:
        h = self.arena.header
        return (time.monotonic(), h.busy_cycles, h.total_cycles, h.loops,
                self.ring.counter("bursts"), consumer_cpu_s(self.thread))

    def begin(self) -> None:
        self.s0 = self._snap()
        self.drops0 = self._drops()
        self.pre0 = preempted(self.proc.pid)

    def finish(self, count: int) -> dict:
        deadline = time.monotonic() + 10
        rx = self.ring.counter("rx_packets")
        while self.loop.descriptors < rx and time.monotonic() < deadline:
            time.sleep(0.01)   # the consumer drains the ring: its CPU belongs to the trial
        time.sleep(0.02)       # one more publication of the worker's loop counters (10 ms)
        s1 = self._snap()
        pre = preempted(self.proc.pid) - self.pre0   # the FIFO consumer's turns included
        self.arena.request_stop()
        stop_proc(self.proc, signal.SIGTERM, timeout=20)
        self.loop.stop_event.set()
        self.thread.join(5)
        drops = self._drops()
        rx = self.ring.counter("rx_packets")   # final, after the worker stopped
        stop_worker(self.proc, self.arena)
        dt, busy, total, loops, bursts, cpu = (b - a for a, b in zip(self.s0, s1, strict=True))
        hz = total / dt   # the loop's TSC cycles over wall time: the TSC rate
        # The FIFO consumer preempts the worker; the share of that time which fell inside busy
        # iterations is the busy share of the worker's own time (busy / total), so the worker's
        # own busy cycles are busy * (total - consumer) / total.
        own = busy * max(total - cpu * hz, 0) / max(total, 1)
        return {"received": rx, "rx_drops": drops, "rx_drops_in_warmup": self.drops0,
                "preempted": pre,
                "consumed": self.loop.descriptors,
                "busy_cycles_per_pkt": busy / max(rx, 1),
                "worker_cycles_per_pkt": own / max(rx, 1),
                "consumer_cycles_per_pkt": cpu * hz / max(rx, 1),
                "path_cycles_per_pkt": (own + cpu * hz) / max(rx, 1),
                "consumer_cpu_frac": cpu / dt,
                "empty_poll_pct": round(100 * (1 - bursts / max(loops, 1)))}


RECEIVERS = {"testpmd": TestpmdRx, "dataplane": DataplaneRx}


def trial(lab: Lab, where: Where, who: str, rate: float, args, probe_pps: float) -> Trial:
    """One trial: `args.seconds` worth of frames at `rate` pps (0: as fast as the generator
    goes, `probe_pps` x seconds frames) into a fresh receiver `who`.

    On memif the generator starts first (it is the server and sends only once a client is
    connected) and the receiver follows; on af_xdp the receiver starts first.  The count
    starts SETTLE after the generator's port took its first frame, and not before it took the
    warm-up's frames: what it could not hand over before (a memif client gives the server room
    only from its first poll on; first touches of buffers fault pages in) is not counted
    against the receiver.  Every frame taken must arrive; drops a receiver counted before the
    count started are left out where it can tell (the dataplane's counters; testpmd's final
    statistics cannot, so its warm-up counts: stricter for testpmd, which lost none there).
    """
    uid = lab.uid()
    # the warm-up: each receiver's first pass over its buffers (memif's, the worker's mbufs
    # and ring slots) faults their pages in, and the dataplane receiver refused frames for the
    # first ~0.2 s at 0.5 Mpps until it had
    warm = 2 * (args.ring_size + where.port_buffers)
    count = warm + int((rate or probe_pps) * (args.seconds + SETTLE))
    if not where.gen_first:
        rx = RECEIVERS[who](lab, where, uid, args)
    gen = Generator(lab, where, uid, rate, count)
    try:
        if where.gen_first:
            rx = RECEIVERS[who](lab, where, uid, args)
        gen.wait_taken(1, timeout=10)
        time.sleep(SETTLE)
        gen.wait_taken(warm, timeout=10)
        rx.begin()
        t0, (tx0, drops0) = time.monotonic(), gen.taken()
        t1 = gen.wait_sent(timeout=5 + 3 * args.seconds)
        sent, drops1 = gen.taken()
        # the receiver first: a memif client whose server left zeroes its port's counters, and
        # testpmd's final statistics then wrap below zero
        res = rx.finish(sent)
    finally:
        gen.stop()
    gen_drops = drops1 - drops0
    took = t1 - t0
    # frames taken per second of the count: the rate offered when nothing was refused.  Refused
    # frames are not added: the token bucket keeps their credit and offers them again, and
    # tx_drops counts every refused attempt, so it is no count of frames.
    offered = (sent - tx0) / took if took > 0 else 0.0
    # a frame the receiver dropped is also one it did not receive: counted once
    warm_drops = res.get("rx_drops_in_warmup", 0)
    lost = gen_drops + max(sent - res["received"] - warm_drops, res["rx_drops"] - warm_drops, 0)
    res |= {"sent": sent, "asked_count": count, "gen_drops": gen_drops,
            "refusing_10ms_polls": len(gen.refusing),
            "first_refusal_s": gen.refusing[0][0] if gen.refusing else None,
            "warmup_taken": tx0, "warmup_not_taken": drops0, "seconds": round(took, 3)}
    return Trial(asked=rate or offered, offered=offered, passed=lost == 0, lost=lost,
                 detail=res)

"""A ring has one consuming process: it claims the ring (pid + start time in the ring header); a
second process is refused with the claimant's name; a dead claimant's claim is taken over, and
so is a claim whose pid now names another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.consumers.loop import ConsumerLoop
from dataplane.shm.arena import Arena
from dataplane.shm.claim import PID_BITS, RingClaimed, start_time
from tests.helpers.live_run import live_run
from tests.helpers.processes import stop_process
from tests.helpers.wait import wait

ROOT = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from dataplane.consumers.loop import ConsumerLoop
from dataplane.shm.arena import Arena
a = Arena.open(Path(sys.argv[1]))
loop = ConsumerLoop([(a, a.rings[0])], [])
print("claimed", flush=True)
time.sleep(300)
"""


def _holder(arena: Arena) -> subprocess.Popen[str]:
    """Another process consuming ring 0 of `arena`, once it has claimed it."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(arena.path)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "claimed"
    return p


def test_a_second_process_is_refused_until_the_first_is_gone(new_arena, caplog):
    arena = new_arena("claim")
    holder = _holder(arena)
    try:
        with pytest.raises(RingClaimed, match=rf"ring 0 .* consumed by pid {holder.pid} \("
                                              rf"{sys.executable} -c"):
            ConsumerLoop([(arena, arena.rings[0])], [])
        # the other ring is nobody's
        ConsumerLoop([(arena, arena.rings[1])], []).close()
    finally:
        stop_process(holder, signal.SIGKILL, 10)
    # the claimant is dead: its claim is taken over, and the log says so
    loop = ConsumerLoop([(arena, arena.rings[0])], [])
    assert f"the claim of pid {holder.pid} (gone) is taken over" in caplog.text
    word = int(arena.rings[0].shared.claim)
    assert word & ((1 << PID_BITS) - 1) == os.getpid()
    assert word >> PID_BITS == start_time(os.getpid())
    loop.close()
    assert int(arena.rings[0].shared.claim) == 0, "close gives the claim up"


def test_a_reused_pid_is_not_the_claimant(new_arena):
    """A live pid with another start time (the pid was reused since): the claim is stale."""
    arena = new_arena("claimpid")
    parent = os.getppid()
    arena.rings[0].shared.claim = ((start_time(parent) or 0) + 1) << PID_BITS | parent
    loop = ConsumerLoop([(arena, arena.rings[0])], [])
    assert int(arena.rings[0].shared.claim) & ((1 << PID_BITS) - 1) == os.getpid()
    loop.close()
    # the real parent's claim is a live one
    arena.rings[0].shared.claim = (start_time(parent) or 0) << PID_BITS | parent
    with pytest.raises(RingClaimed, match=f"consumed by pid {parent}"):
        ConsumerLoop([(arena, arena.rings[0])], [])


def test_the_same_process_claims_again(new_arena):
    arena = new_arena("claimself")
    first = ConsumerLoop([(arena, arena.rings[0])], [])
    second = ConsumerLoop([(arena, arena.rings[0])], [])     # one process, one consumer
    second.close()
    first.close()


@pytest.mark.root("a dataplane run: network namespaces and veths")
def test_a_running_dataplane_owns_its_rings(tmp_path: Path):
    from dataplane.run.status import find_arenas
    with live_run(tmp_path, "clm") as run:
        wait(lambda: find_arenas("rxclm", [Path("/dev/shm")]), "the receiver's arena", 30)
        with Arena.open(find_arenas("rxclm", [Path("/dev/shm")])[0]) as arena:
            with pytest.raises(RingClaimed, match=rf"consumed by pid {run.proc.pid} \(.*"
                                                  r"dataplane\.cli run"):
                ConsumerLoop([(arena, arena.rings[0])], [])
            time.sleep(0.5)
            assert run.proc.poll() is None, run.output()

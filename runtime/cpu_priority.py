"""Lower the CPU priority (Unix niceness) of this whole process: a run's ``resources.cpu_nice``.

    lower_cpu_priority(19)      # first thing in an actor's __init__
    thread_niceness()           # {tid: nice} of every thread of this (or another) process

On Linux ``setpriority(PRIO_PROCESS, 0, n)`` changes only the calling *thread*, and a new thread
starts with the niceness of the thread that created it. So `lower_cpu_priority` sets every thread
listed in ``/proc/self/task`` and repeats until a pass finds none below ``n`` (a thread started
during a pass by one not yet changed is caught by the next). Called before vLLM, torch or OpenMP
start their thread pools and before any child process exists, everything the process creates
afterwards — threads, and processes such as math-verify workers and sandboxes — inherits it.
Elsewhere (no ``/proc``) the process-wide call is the best there is.

Never lowers niceness: without privileges it can only go up, and a thread already above ``n`` is
left where it is, so ``n`` is a floor. That matters with Ray: at the end of its start-up a Ray
worker calls ``nice(RAY_worker_niceness)`` (15 by default, added to the raylet's niceness) on its
main thread only, so the threads that thread starts later (the actor's calls, vLLM's and torch's
pools) run at +15 while the ~20 threads Ray started before (its gRPC and event-loop threads) keep
the raylet's. After ``lower_cpu_priority(19)`` every thread is at 19; with ``n`` = 10 the +15
threads stay at 15 and only the others move to 10.

Standard library only, so the rollout and reward actors import it without the control plane.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: The largest Unix niceness (lowest priority).
MAX_NICE = 19


def check_nice(nice: int) -> int:
    """``nice`` as an int in 0..19, else ValueError."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= MAX_NICE:
        raise ValueError(f"cpu_nice must be an integer from 0 (unchanged) to {MAX_NICE} (lowest CPU "
                         f"priority), got {nice!r}")
    return nice


def lower_cpu_priority(nice: int) -> int:
    """Raise the niceness of every thread of this process to at least ``nice`` (0..19; 0 changes
    nothing). Returns how many threads were changed."""
    check_nice(nice)
    if nice == 0:
        return 0
    if not os.path.isdir("/proc/self/task"):
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            return 1
        return 0
    changed = 0
    for _ in range(100):  # a handful of passes at most; bounded in case threads keep appearing
        this_pass = 0
        for name in os.listdir("/proc/self/task"):
            tid = int(name)
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    this_pass += 1
            except ProcessLookupError:  # the thread ended meanwhile
                continue
        changed += this_pass
        if this_pass == 0:
            break
    if changed:
        log.info("cpu_nice: %d thread(s) of process %d now at niceness %d", changed, os.getpid(), nice)
    return changed


def thread_niceness(pid: int | str = "self") -> dict[int, int]:
    """``{tid: niceness}`` of every thread of a process, from ``/proc/<pid>/task/<tid>/stat``
    (field 19). Linux only."""
    out: dict[int, int] = {}
    task = f"/proc/{pid}/task"
    for name in os.listdir(task):
        try:
            with open(f"{task}/{name}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # "tid (comm) state ppid ...": comm may hold spaces and parentheses; fields 3.. follow the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = int(fields[19 - 3])
    return out


__all__ = ["MAX_NICE", "check_nice", "lower_cpu_priority", "thread_niceness"]

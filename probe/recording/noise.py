"""Was the machine quiet? The busy-machine detector (pure functions over recorded numbers),
and :class:`RunCpu`, the recorder's observer that reads them around each ``generate()``.

Timings are only as good as the machine was quiet: a process that waits for a CPU while other
processes run shows every host time longer, by whatever the scheduler decided. Two measures,
both recorded while profiling, neither an estimate of what the step "should" cost:

- **Run-queue wait** (Linux): the kernel's per-thread ``run_delay`` (``/proc/self/task/*/
  schedstat``), the time each of the process's threads was ready to run but waited for a CPU,
  summed over the threads and read when ``generate()`` starts and ends
  (``runs.cpu_wait_ms``; ``runs.process_cpu_ms`` is the CPU time of the same stretch). The
  share ``wait / (wait + cpu)`` is the part of the time the process was ready to run that it
  spent waiting: 0 on a quiet machine whatever the number of threads, 50 % when every thread
  shares its core with one busy neighbour. Sleeping (I/O, a CUDA sync that blocks) is not
  waiting, so a GPU run is measured as fairly as a CPU one.
- **Wall time beyond CPU time**, per step (any OS): ``steps.forward_ms`` against
  ``steps.process_cpu_ms``. While at least one of the process's threads runs, CPU time grows
  at least as fast as wall time, so ``forward_ms - process_cpu_ms`` is a lower bound of the
  time no thread of the process was on a CPU. With ``n = min(torch threads, cores available)``
  a quiet step lies between ``cpu / n`` (all threads busy) and ``cpu`` (one thread busy: the
  Python part of a small model's decode step), so only wall time beyond ``cpu`` is evidence
  of waiting; ``cpu / n`` bounds what the step could have taken. On CUDA the host may sleep in
  a synchronisation, so this measure is used on CPU runs only.

:func:`quiet_now` asks the same question before a measurement of the machine itself (the CPU's
peaks, :func:`probe.hardware.cpu_peaks`): will the threads it runs each find a free CPU?

The run's **noise figure** (:func:`busy`) is the larger of the two shares available; above
:data:`BUSY_THRESHOLD_PCT` the terminal, the HTML report and the dashboard say the machine was
busy. What it affects: host times (``calls.cpu_ms``, ``steps.forward_ms``/``outside_ms``) and
the figures made of them (TTFT, TPOT, tok/s). CUDA event times (``gpu_ms``) measure the GPU's
own work and are not stretched by a busy host, although a starved host can leave the GPU idle
between kernels.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from .observer import Contribution, Observer

#: a run whose noise figure passes this share (percent) is reported as busy
BUSY_THRESHOLD_PCT = 10.0
#: a step is "descheduled" when its wall time beyond CPU time passes this share of the step
STEP_THRESHOLD = 0.2

_TASKS = "/proc/self/task"
#: Linux's load figures: ``load1 load5 load15 runnable/total last_pid``
LOADAVG = "/proc/loadavg"


def cores_available() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The one-minute load average (runnable and running tasks of the whole machine), or ``None``."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def threads_for_load(default: int, cores: int, load: float | None) -> int:
    """Threads to run torch with when the machine already has ``load`` runnable tasks.

    torch starts one intra-op thread per core; when other work holds those cores, its threads
    wait for each other at every operator's barrier and decode steps can take many times longer
    (measured on two shared cores: TPOT 828 ms at torch's default, 182 ms with one thread).
    So: the cores left free, rounded, at least one, at most torch's default.
    """
    if load is None:
        return default
    free = int(cores - load + 0.6)  # a little of the load is this process starting up
    return max(1, min(default, free))


def host_facts() -> dict:
    """``{"torch_threads", "cpu_cores"}``: what the per-step CPU time is normalised by."""
    try:
        import torch

        threads = int(torch.get_num_threads())
    except Exception:  # pragma: no cover - torch is always there when recording
        threads = 1
    return {"torch_threads": threads, "cpu_cores": cores_available()}


# this process's pid, per thread id an open descriptor of its schedstat, and one of the process's
# stat (its thread count): re-read with one pread each (listing the threads and opening each file
# on every read cost ~45 µs of a one-token generate's end-of-run work, the listing alone ~25 µs
# after a forward); a fork starts over, as its descriptors would read the parent's threads
_SCHEDSTAT: dict = {"pid": None, "fds": {}, "stat": None}


def _schedstat_cache() -> dict:
    cache = _SCHEDSTAT
    if cache["pid"] != os.getpid():  # a child's copies of the parent's descriptors are left alone
        cache.update(pid=os.getpid(), fds={}, stat=None)
    return cache


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _thread_count(cache: dict) -> int | None:
    """The process's thread count from its stat (field 20), through a kept descriptor."""
    try:
        if cache["stat"] is None:
            cache["stat"] = os.open("/proc/self/stat", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        raw = os.pread(cache["stat"], 1024, 0)
        return int(raw[raw.rfind(b")") + 2:].split()[17])  # fields after "(comm)" start at the 3rd
    except (OSError, IndexError, ValueError):
        return None


def _read_delay(fd: int) -> int:
    """run_delay, the second field of a schedstat, through an open descriptor."""
    return int(os.pread(fd, 128, 0).split()[1])


def _run_delay_of(fds: dict[str, int], tid: str) -> int | None:
    """One thread's run_delay through its cached descriptor, (re)opened as needed; None if the
    thread ended."""
    for _ in range(2):
        fd = fds.get(tid)
        try:
            if fd is None:
                fd = fds[tid] = os.open(f"{_TASKS}/{tid}/schedstat", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return _read_delay(fd)
        except (OSError, IndexError, ValueError):
            # ended, or a new thread took an ended one's id: the old descriptor is stale
            _close(fds.pop(tid, None))
    return None


def _known_threads(fds: dict[str, int]) -> dict[str, int] | None:
    """Every known thread's run_delay, or None if one of them ended (its descriptor fails)."""
    out = {}
    for tid, fd in fds.items():
        try:
            out[tid] = _read_delay(fd)
        except (OSError, IndexError, ValueError):
            return None
    return out


def read_run_delay(known: bool = False) -> dict[str, int] | None:
    """Per thread of this process, nanoseconds spent ready to run but waiting for a CPU.

    ``known``: read only the threads seen at the last read, without checking for new ones (one
    ``pread`` per thread: the read that closes a run, where every microsecond lands after the
    run's clock stopped and before the caller gets generate's output back; a thread born during
    the run is left out, so the wait stays a lower bound). ``None`` where the kernel has no
    schedstat (not Linux, or a kernel without it).
    """
    cache = _schedstat_cache()
    fds = cache["fds"]
    # the same threads as last time (as many, and each still there): no listing
    if fds and (known or _thread_count(cache) == len(fds)):
        got = _known_threads(fds)
        if got is not None:
            return got
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    out: dict[str, int] = {}
    for tid in tids:
        v = _run_delay_of(fds, tid)
        if v is not None:
            out[tid] = v
    for gone in set(fds).difference(tids):  # threads that ended since the last read
        _close(fds.pop(gone))
    return out or None


def run_delay_between(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Run-queue wait (ns) summed over the threads between two :func:`read_run_delay` reads;
    a thread born in between counts from zero."""
    if before is None or after is None:
        return None
    return float(sum(max(0, v - before.get(tid, 0)) for tid, v in after.items()))


class RunCpu(Observer):
    """Process CPU time and run-queue wait over each ``generate()`` (real clock only): read when
    the run opens and as it closes, both inside its window (the probe's work there is the run's
    ``probe_start_ms`` and ``probe_end_ms``), so the stretch measured lies within the run and
    its wait is a lower bound of the run's. Fills ``runs.process_cpu_ms`` and
    ``runs.cpu_wait_ms`` from its own records (run id -> ns)."""

    columns = {"runs": {"process_cpu_ms": "float64", "cpu_wait_ms": "float64"}}

    def __init__(self) -> None:
        # run id -> (CPU ns, run delays at its start, at its end): the wait is worked out when
        # the frames are built, not in the few microseconds before generate returns
        self.runs: dict[str, tuple[int, dict | None, dict | None]] = {}
        self._open: tuple[str, dict | None, int] | None = None  # (run id, run delays, CPU ns) at its start

    def run_begin(self, run: Any) -> None:
        sched0 = read_run_delay()
        self._open = (run.run_id, sched0, time.process_time_ns())

    def run_closing(self, run: Any) -> None:
        opened, self._open = self._open, None
        if opened is None or opened[0] != run.run_id:
            return
        cpu_ns = time.process_time_ns() - opened[2]
        self.runs[run.run_id] = (cpu_ns, opened[1], read_run_delay(known=True))

    def run_end(self, run: Any) -> None:
        if run is None:  # the probe could not mark the start: nothing is measured
            self._open = None

    def stop(self, reason: str) -> None:
        self._open = None  # a generate cut short by detach: its CPU time was not measured

    def clear(self) -> None:
        self.runs = {}

    def records(self) -> dict:
        return {rid: (cpu_ns, run_delay_between(before, after)) for rid, (cpu_ns, before, after) in self.runs.items()}

    @classmethod
    def frames(cls, records: Any, *, calls: Any, steps: Any, runs: Any, rank: int) -> Contribution:
        if not records:
            return Contribution()
        ids = list(records)
        return Contribution(runs=pd.DataFrame({
            "run_id": ids,
            "process_cpu_ms": [records[r][0] * 1e-6 for r in ids],
            "cpu_wait_ms": [records[r][1] * 1e-6 if records[r][1] is not None else math.nan for r in ids],
        }))


def step_wait_ms(forward_ms, process_cpu_ms):
    """Per step, the lower bound of the time no thread of the process was on a CPU:
    ``max(0, forward_ms - process_cpu_ms)`` (NaN where CPU time was not recorded).

    Works on scalars, numpy arrays and pandas Series alike.
    """
    return np.maximum(forward_ms - process_cpu_ms, 0.0)


@dataclass(frozen=True)
class Busy:
    """The run's noise figure and what it was made of.

    Attributes:
        wait_pct: the noise figure: the larger of ``runqueue_pct`` and ``steps_pct`` (NaN when
            neither could be measured).
        runqueue_pct: run-queue wait over (wait + CPU time) of the generate calls, percent.
        steps_pct: wall time beyond CPU time over wall time of the forwards (CPU runs), percent.
        steps_descheduled: steps whose wall time beyond CPU time passes :data:`STEP_THRESHOLD`.
        steps: steps looked at.
        threshold_pct: :data:`BUSY_THRESHOLD_PCT`.
        busy: ``wait_pct`` passed the threshold.
        threads, cores: torch's threads and the cores available when recorded (None if unknown).
        cuda: the run's forwards were timed with CUDA events.
    """

    wait_pct: float
    runqueue_pct: float
    steps_pct: float
    steps_descheduled: int
    steps: int
    threshold_pct: float
    busy: bool
    threads: int | None = None
    cores: int | None = None
    cuda: bool = False

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @property
    def parallel(self) -> int | None:
        """``min(threads, cores)``: the most CPUs the run's forwards could use at once."""
        if self.threads is None or self.cores is None:
            return None
        return max(1, min(self.threads, self.cores))

    def message(self) -> str:
        """The warning line (empty when the machine was quiet or nothing was measured)."""
        if not self.busy:
            return ""
        text = (f"the machine was busy: {self.wait_pct:.0f} % of step time was spent waiting for a CPU; "
                "rerun on a quiet machine or with `--repeat`")
        if self.cuda:
            text += (". Host times, TTFT, TPOT and tok/s are affected; GPU event times (gpu_ms) are not, "
                     "though the GPU may have idled waiting for the host")
        return text


def busy(steps: pd.DataFrame, runs: pd.DataFrame | None = None, meta: dict | None = None,
         threshold_pct: float = BUSY_THRESHOLD_PCT) -> Busy:
    """The noise figure of a recording (see the module docstring for both measures).

    Args:
        steps: the ``steps`` frame (``forward_ms``, ``process_cpu_ms``, ``gpu_ms``).
        runs: the ``runs`` frame (``cpu_wait_ms``, ``process_cpu_ms`` of each generate call).
        meta: the run's metadata (``torch_threads``, ``cpu_cores`` where recorded).
        threshold_pct: the share above which the run counts as busy.
    """
    meta = meta or {}
    cuda = bool(len(steps)) and bool(steps["gpu_ms"].notna().any())
    st = steps[steps["process_cpu_ms"].notna()] if len(steps) else steps
    steps_pct = math.nan
    desched = 0
    if len(st) and not cuda:
        fwd = st["forward_ms"].astype("float64")
        wait = step_wait_ms(fwd, st["process_cpu_ms"].astype("float64"))
        total = float(fwd.sum())
        if total > 0:
            steps_pct = 100.0 * float(wait.sum()) / total
        desched = int((wait > STEP_THRESHOLD * fwd).sum())
    runqueue_pct = math.nan
    if runs is not None and len(runs) and "cpu_wait_ms" in runs:
        r = runs[runs["cpu_wait_ms"].notna() & runs["process_cpu_ms"].notna()]
        w, c = float(r["cpu_wait_ms"].sum()), float(r["process_cpu_ms"].sum())
        if len(r) and w + c > 0:
            runqueue_pct = 100.0 * w / (w + c)
    vals = [v for v in (runqueue_pct, steps_pct) if not math.isnan(v)]
    wait_pct = max(vals) if vals else math.nan
    threads, cores = meta.get("torch_threads"), meta.get("cpu_cores")
    return Busy(
        wait_pct=wait_pct, runqueue_pct=runqueue_pct, steps_pct=steps_pct, steps_descheduled=desched,
        steps=int(len(st)), threshold_pct=float(threshold_pct),
        busy=bool(vals) and wait_pct > threshold_pct,
        threads=int(threads) if isinstance(threads, (int, float)) else None,
        cores=int(cores) if isinstance(cores, (int, float)) else None, cuda=cuda,
    )


# --------------------------------------------------------------------------- quiet enough to measure?
@dataclass(frozen=True)
class Verdict:
    """Whether the machine is quiet enough to measure its peaks, and the numbers behind it."""

    quiet: bool
    why: str


def _own_running_threads() -> int:
    """Threads of this process the kernel has running or runnable now (state ``R``)."""
    n = 0
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] == b"R":  # the field after "(comm)": comm may hold spaces
            n += 1
    return max(n, 1)  # the reading thread runs


def quiet_now(threads: int | None = None, samples: int = 5, interval_s: float = 0.01) -> Verdict:
    """Is the machine quiet enough to measure its CPU peaks now?

    Used before measuring the CPU's peaks (:func:`probe.hardware.cpu_peaks`). Quiet means every
    thread the measurement will use finds a CPU no other work wants: in the
    median of ``samples`` reads of ``/proc/loadavg`` (``interval_s`` apart), the runnable
    tasks other than this process's own running threads, plus ``threads`` (torch's), fit in the
    machine's CPUs. The load average itself is not used: it lags by a minute and counts this
    process's own generate calls. Where there is no ``/proc/loadavg`` (not Linux), the
    1-minute load average must leave a CPU for each thread. The measurement then checks
    itself (:data:`probe.hardware.QUIET_WAIT_PCT`), so a verdict of "quiet" is necessary, not sufficient.

    Args:
        threads: threads the measurement will run (default: ``torch.get_num_threads()``).
        samples, interval_s: how many instantaneous reads, how far apart.
    """
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    others: list[int] = []
    for i in range(samples):
        try:
            with open(LOADAVG, encoding="ascii") as f:
                runnable = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            break
        others.append(max(0, runnable - _own_running_threads()))
        if i + 1 < samples:
            time.sleep(interval_s)
    if others:
        other = sorted(others)[len(others) // 2]
        ok = other + threads <= cpus
        return Verdict(ok, f"{other} other runnable task{'s' if other != 1 else ''} + {threads} torch "
                           f"thread{'s' if threads != 1 else ''} {'≤' if ok else '>'} {cpus} CPUs ({LOADAVG})")
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return Verdict(False, "no load figures on this system")
    ok = load1 + threads <= cpus
    return Verdict(ok, f"1-minute load {load1:.2f} + {threads} torch threads {'≤' if ok else '>'} {cpus} CPUs")

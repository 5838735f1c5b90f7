"""Interleaved timing of several libraries on one case.

The libraries run in rotation in the same process (A B C A B C ...), so a change in the
machine's speed (another job, frequency scaling, a neighbour on the host) hits all of them
alike and cancels out of their ratios.  So that a slow library does not hold the fast ones
to its handful of runs (or the fast ones make the slow one run for minutes), a turn of the
rotation gives every library about the same wall time: the longest single call, so the
slowest library runs once per turn and a library ten times faster runs ten calls.  Turns
repeat until every library has at least ``min_repeats`` calls and ``min_time`` seconds in
all; each library's time is the median of its calls.
"""
import gc
import math
import time

try:
    import resource
except ImportError:         # (not POSIX: no fault counts)
    resource = None


def _minor_faults():
    """The process's minor page faults so far (0 where the count is unavailable)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _call_time(fn):
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out
    return t1 - t0


def interleaved(runners, warmup=2, min_repeats=5, min_time=0.3, max_repeats=10000,
                max_seconds=60.0, warmup_cap=0.25, faults=None):
    """Time each runner; returns ``{name: [seconds per call, ...]}``.

    First ``warmup`` untimed calls of each in rotation (at least one, which also estimates
    its duration; none more once a library has spent ``warmup_cap`` seconds warming up).
    Then turns of the rotation as described in the module docstring, stopping once every
    runner has ``min_repeats`` calls and ``min_time`` seconds (or ``min_repeats`` calls and
    one of them ``max_repeats``), or after ``max_seconds``.  Python's garbage collector is
    off while timing.  ``faults``: a dict that receives each runner's minor page faults per
    timed call (the whole process's, counted around each turn's calls of the runner: a fresh
    output's pages touched for the first time show there, and cost ~0.1-0.4 us each)."""
    names = list(runners)
    est = {n: math.inf for n in names}
    warm = {n: 0.0 for n in names}
    for i in range(max(1, warmup)):
        for n in names:
            if i == 0 or warm[n] < warmup_cap:
                t = _call_time(runners[n])
                est[n] = min(est[n], t)
                warm[n] += t
    turn = max(est.values())
    cap = max(1, max_repeats // max(1, min_repeats))
    per_turn = {n: max(1, min(cap, int(round(turn / max(est[n], 1e-7))))) for n in names}
    times = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    nflt = {n: 0 for n in names}
    start = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            for n in names:
                fn, ts = runners[n], times[n]
                f0 = _minor_faults()
                for _ in range(per_turn[n]):
                    t0 = time.perf_counter()
                    out = fn()
                    t1 = time.perf_counter()
                    del out
                    ts.append(t1 - t0)
                    spent[n] += t1 - t0
                nflt[n] += _minor_faults() - f0
            if all(len(times[n]) >= min_repeats for n in names):
                if all(spent[n] >= min_time for n in names) \
                        or any(len(times[n]) >= max_repeats for n in names):
                    break
            if time.perf_counter() - start > max_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    if faults is not None:
        for n in names:
            faults[n] = nflt[n] / max(len(times[n]), 1)
    return times


def summary(ts):
    """Median, quartiles and minimum in milliseconds, and the number of calls."""
    s = sorted(ts)
    n = len(s)

    def q(f):
        i = f * (n - 1)
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        return (s[lo] + (s[hi] - s[lo]) * (i - lo)) * 1e3

    return {"median_ms": q(0.5), "p25_ms": q(0.25), "p75_ms": q(0.75), "min_ms": s[0] * 1e3,
            "n": n}

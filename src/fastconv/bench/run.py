"""fastconv's benchmark suite: fastconv against PyTorch CPU, ONNX Runtime and plain NumPy.

Run ``python benchmarks/run.py`` (about ten minutes on two cores), or ``--quick`` for a
smoke run; ``--help`` lists the options and ``benchmarks/README.md`` explains the method.
Every case runs all libraries in rotation in this one process and reports the median time,
GFLOP/s and the fraction of the BLAS roofline measured in the same run, the ratio of each
peer's time to fastconv's, and fastconv's peak memory.

``main(argv=None) -> int`` is the entry point (``fastconv bench`` calls it).  Optional
libraries (torch, onnx/onnxruntime, matplotlib) are imported only when used; a missing one
only removes its columns.
"""
import argparse
import datetime
import importlib
import importlib.util
import math
import os
import sys
import time

_PACKAGE = "fastconv_benchmarks"


def _package():
    """This folder as a package, so the helper modules can import each other relatively,
    whether this file runs as a script, is loaded by path, or is ``benchmarks.run``."""
    if __package__:
        return importlib.import_module(__package__)
    here = os.path.dirname(os.path.abspath(__file__))
    cached = sys.modules.get(_PACKAGE)
    if cached is not None and list(getattr(cached, "__path__", [])) == [here]:
        return cached
    spec = importlib.util.spec_from_file_location(
        _PACKAGE, os.path.join(here, "__init__.py"), submodule_search_locations=[here])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_PACKAGE]
        raise
    return mod


def _helpers():
    name = _package().__name__
    return tuple(importlib.import_module(f"{name}.{m}")
                 for m in ("cases", "peers", "machine", "timing", "report"))


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

_LIB_ALIASES = {"torch": "torch", "pytorch": "torch", "ort": "onnxruntime",
                "onnxruntime": "onnxruntime", "onnx": "onnxruntime", "numpy": "numpy",
                "np": "numpy", "fastconv": "fastconv", "fc": "fastconv"}


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()]


def _threads(value):
    out = []
    for v in _csv(value):
        if v.lower() in ("all", "max"):
            n = os.cpu_count() or 1
        else:
            try:
                n = int(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad thread count {v!r}") from None
            if n < 1:
                raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {n}")
        if n not in out:
            out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no thread count given")
    return out


def _dtypes(value):
    out = []
    for v in _csv(value):
        v = {"f32": "float32", "f64": "float64", "float": "float32",
             "double": "float64"}.get(v.lower(), v.lower())
        if v not in ("float32", "float64"):
            raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {v!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no dtype given")
    return out


def _modes(value):
    out = []
    for v in _csv(value):
        v = {"forward": "fwd", "fwd+bwd": "fwdbwd", "backward": "fwdbwd",
             "bwd": "fwdbwd"}.get(v.lower(), v.lower())
        if v not in ("fwd", "fwdbwd"):
            raise argparse.ArgumentTypeError(f"mode must be fwd or fwdbwd, got {v!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no mode given")
    return out


def _libs(value):
    out = []
    for v in _csv(value):
        if v.lower() not in _LIB_ALIASES:
            raise argparse.ArgumentTypeError(
                f"unknown library {v!r} (choose from torch, onnxruntime, numpy)")
        name = _LIB_ALIASES[v.lower()]
        if name != "fastconv" and name not in out:
            out.append(name)
    return out


def _parser():
    p = argparse.ArgumentParser(
        prog="fastconv bench" if os.path.basename(sys.argv[0]) == "fastconv"
        else "benchmarks/run.py",
        description="Benchmark fastconv against PyTorch CPU, ONNX Runtime and plain NumPy "
                    "(each optional), interleaved in one process.",
        epilog="ratio = peer time / fastconv time (> 1: fastconv is faster); best = the "
               "faster of PyTorch and ONNX Runtime.  See benchmarks/README.md.")
    p.add_argument("--threads", type=_threads, default=None, metavar="LIST",
                   help="thread counts, e.g. 1,2 or 1,all (default: 1 and os.cpu_count())")
    p.add_argument("--dtypes", type=_dtypes, default=["float32", "float64"], metavar="LIST",
                   help="float32,float64 (default: both)")
    p.add_argument("--cases", default="", metavar="SUBSTRINGS",
                   help="run the cases whose name contains any of these comma-separated "
                        "substrings (e.g. conv.,pool); default: all (see --list)")
    p.add_argument("--modes", type=_modes, default=["fwd", "fwdbwd"], metavar="LIST",
                   help="fwd,fwdbwd (default: both)")
    p.add_argument("--libs", type=_libs, default=["torch", "onnxruntime", "numpy"],
                   metavar="LIST", help="baselines to compare with (default: "
                   "torch,onnxruntime,numpy; fastconv always runs)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="at least N timed calls per library and case (default 5; 3 with "
                        "--quick)")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                   help="at least this much timed run time per library and case "
                        "(default 0.3; 0.02 with --quick)")
    p.add_argument("--max-repeats", type=int, default=2000, metavar="N",
                   help="at most about N calls per library and case (default 2000)")
    p.add_argument("--max-case-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="stop timing a case after this long (default 30)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="untimed calls per library before timing a case (default 2; 1 with "
                        "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats and a small roofline: a smoke run, not a measurement")
    p.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    p.add_argument("--png", metavar="PATH",
                   help="draw the best-peer ratios to this PNG (needs matplotlib)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-roofline", action="store_true", help="skip the BLAS roofline")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def _rel_err(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a))), 1e-30)
    return float(np.max(np.abs(a - b))) / scale


def _first_line(e):
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:200] if s else ''}"


class _Runner:
    def __init__(self, args, helpers, peers, machine, write):
        self.args = args
        self.cases, self.peers_mod, self.machine_mod, self.timing, self.report = helpers
        self.peers = peers
        self.machine = machine
        self.env = self.machine_mod.compact(machine)
        self.write = write

    def build(self, case, mode, dtype, threads):
        """{lib: runner} and {lib: why not} for one case/mode/dtype, fastconv first."""
        data = self.cases.make_data(case, dtype, self.args.seed)
        runners, missing = {}, {}
        builders = {"fastconv": self.cases.build_fastconv}
        builders.update({p: self.peers_mod.BUILDERS[p] for p in self.peers})
        for lib, build in builders.items():
            try:
                runners[lib] = build(case, mode, data, threads)
            except self.cases.Unsupported as e:
                missing[lib] = str(e)
            except Exception as e:  # noqa: BLE001 - a baseline that fails must not stop us
                missing[lib] = f"build failed: {_first_line(e)}"
        return runners, missing

    def check(self, dtype, runners, missing):
        """Run every runner once: this warms the allocators, measures the memory a call uses
        (unless --no-memory) and compares each peer's outputs with fastconv's.  Returns
        {lib: {"check": status, "max_rel_err": err, "mem": {...}}}."""
        tol = 1e-4 if dtype == "float32" else 1e-9
        ref, info = None, {}
        for lib in list(runners):
            d = info[lib] = {}
            try:
                if self.args.no_memory:
                    out = runners[lib]()
                elif lib == "fastconv":
                    with self.cases.fresh_caches():
                        out, d["mem"] = self.machine_mod.measure_memory(runners[lib], True)
                else:
                    out, d["mem"] = self.machine_mod.measure_memory(runners[lib],
                                                                    traced=lib == "numpy")
                out = self.peers_mod.to_numpy(out)
            except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
                del runners[lib], info[lib]
                missing[lib] = f"run failed: {_first_line(e)}"
                continue
            if lib == "fastconv":
                ref = out
                d["check"], d["max_rel_err"] = "reference", 0.0
            elif ref is None:
                d["check"], d["max_rel_err"] = "unchecked", None
            else:
                err = (max((_rel_err(a, b) for a, b in zip(ref, out)), default=0.0)
                       if len(out) == len(ref) else math.inf)
                d["check"] = "ok" if err <= tol else "MISMATCH"
                d["max_rel_err"] = err if math.isfinite(err) else None
        return info

    def measure(self, case, mode, dtype, threads, roof, runners, missing, info):
        a = self.args
        faults = {}
        times = self.timing.interleaved(runners, warmup=a.warmup, min_repeats=a.repeats,
                                        min_time=a.min_time, max_repeats=a.max_repeats,
                                        max_seconds=a.max_case_seconds, faults=faults)
        flops = self.cases.flops(case, mode)
        nb = self.cases.nbytes(case, mode, 4 if dtype == "float32" else 8)
        libs = {}
        for lib, ts in times.items():
            s = self.timing.summary(ts)
            sec = s["median_ms"] / 1e3
            s["gflops"] = flops / sec / 1e9 if flops else None
            s["roofline_frac"] = (s["gflops"] / roof
                                  if s["gflops"] is not None and roof else None)
            s["gbps"] = nb / sec / 1e9 if nb else None
            s["faults_per_call"] = faults.get(lib)
            s.update(info.get(lib, {}))
            libs[lib] = s
        for lib, why in missing.items():
            libs[lib] = {"unsupported": why}
        fc = libs["fastconv"]["median_ms"]
        ratios = {p: libs[p]["median_ms"] / fc for p in self.peers
                  if "median_ms" in libs.get(p, {})}
        best = min((p for p in ("torch", "onnxruntime") if p in ratios),
                   key=lambda p: libs[p]["median_ms"], default=None)
        ratios["best_peer"] = ratios[best] if best else None
        return {"case": case.name, "kind": case.kind, "mode": mode, "dtype": dtype,
                "threads": threads, "desc": case.desc, "params": dict(case.p),
                "flops": flops, "bytes": nb, "roofline_gflops": roof, "libs": libs,
                "ratios": ratios, "best_peer": best,
                "loadavg": self.machine_mod.loadavg(), "env": self.env}


def _settings(args, parser):
    if args.quick:
        args.repeats = 3 if args.repeats is None else args.repeats
        args.min_time = 0.02 if args.min_time is None else args.min_time
        args.warmup = 1 if args.warmup is None else args.warmup
    else:
        args.repeats = 5 if args.repeats is None else args.repeats
        args.min_time = 0.3 if args.min_time is None else args.min_time
        args.warmup = 2 if args.warmup is None else args.warmup
    if args.threads is None:
        args.threads = _threads("1,all")
    for name in ("repeats", "max_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.min_time < 0 or args.max_case_seconds <= 0:
        parser.error("--warmup and --min-time must be >= 0, --max-case-seconds > 0")


def quiet_blas_reexec(argv):
    """Restart this program with OPENBLAS_THREAD_TIMEOUT=4 unless it is set.

    OpenBLAS's idle worker threads spin for about 2**28 cycles after each call by default;
    NumPy's copy (the plain-NumPy baseline) then held one of a 2-core machine's cores while the
    next library in the rotation, fastconv, was timed: fastconv's 2-thread convolutions measured
    ~1.5x slower than without the NumPy baseline.  The variable only takes effect before the
    library loads, hence the restart; only when run as a program (POSIX), never in-process."""
    if os.name != "posix" or os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        return
    env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT="4")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastconv.bench.run", *argv], env)


def main(argv=None):
    """Run the suite; returns the exit status (0: done, 2: bad arguments).  Called without
    argv (as a program) it first restarts itself with quiet OpenBLAS threads (see
    quiet_blas_reexec)."""
    def write(s=""):
        print(s, flush=True)

    if argv is None:
        quiet_blas_reexec(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _settings(args, parser)
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    helpers = _helpers()
    cases_mod, peers_mod, machine_mod, timing, report = helpers
    if args.list:
        for c in cases_mod.CASES:
            write(f"{c.name:18s} {c.desc}")
        return 0
    selected = cases_mod.select(args.cases)
    if not selected:
        write(f"no case matches --cases {args.cases!r}; the cases are: "
              + ", ".join(c.name for c in cases_mod.CASES))
        return 2

    import fastconv  # noqa: F401 - the library under test is not optional

    t_start = time.perf_counter()
    peers, peers_missing = [], {}
    for p in peers_mod.PEERS:
        if p not in args.libs:
            continue
        why = peers_mod.available(p)
        if why is None:
            peers.append(p)
        else:
            peers_missing[p] = why
            write(f"note: leaving out {p}: {why}")
    machine = machine_mod.describe()
    write(f"fastconv {machine['versions']['fastconv']} on {machine['cpu_model']}, "
          f"{machine['cpu_count']} CPUs ({machine['physical_cores']} cores), "
          f"load {machine['loadavg_start']}")
    write("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()
                                   if v is not None))
    write("BLAS: " + ", ".join(f"{b.get('internal_api')} {b.get('version')} "
                               f"{b.get('architecture')}" for b in machine["blas"]
                               if b.get("user_api") == "blas")
          + f"; fastconv GEMM: {machine['fastconv_gemm']}")
    if machine["openblas_coretype_env"]:
        write(f"warning: OPENBLAS_CORETYPE={machine['openblas_coretype_env']} is set: OpenBLAS "
              "runs those kernels, not the ones it would pick for this CPU")
    load = machine["loadavg_start"]
    if load and load[0] > 0.5 * (machine["usable_cpus"] or machine["cpu_count"] or 1):
        write(f"warning: the machine is busy (load {load[0]:.1f} on "
              f"{machine['usable_cpus'] or machine['cpu_count']} CPUs): times are noisy, and "
              "multi-threaded ones mostly measure how each library copes with losing a core")
    write(f"threads {args.threads}, dtypes {args.dtypes}, modes {args.modes}, "
          f"{len(selected)} case(s); median of >= {args.repeats} calls and >= "
          f"{args.min_time:g} s per library, after {args.warmup} warm-up call(s)")

    runner = _Runner(args, helpers, peers, machine, write)
    table = report.Table(peers, write)
    results, rooflines = [], []
    for t in args.threads:
        with machine_mod.Threads(t, "torch" in peers):
            roof = {"threads": t}
            if not args.no_roofline:
                roof = machine_mod.roofline(t, quick=args.quick)
                rooflines.append(roof)
            for dt in args.dtypes:
                table.header(t, dt, roof)
                roof_gf = roof.get("sgemm" if dt == "float32" else "dgemm", {}).get("gflops")
                jobs = []
                for case in selected:
                    for mode in args.modes:
                        runners, missing = runner.build(case, mode, dt, t)
                        jobs.append((case, mode, runners, missing))
                # warm every allocator once (every runner of the block, untimed) and check
                # that every library computes what fastconv computes
                checked = []
                for case, mode, runners, missing in jobs:
                    checked.append(runner.check(dt, runners, missing))
                for (case, mode, runners, missing), checks in zip(jobs, checked):
                    if "fastconv" not in runners:
                        write(f"{case.name:16s}  {mode:6s}  fastconv failed: "
                              f"{missing.get('fastconv')}")
                        continue
                    r = runner.measure(case, mode, dt, t, roof_gf, runners, missing, checks)
                    results.append(r)
                    table.row(r)
                del jobs
    report.summary(results, write)
    elapsed = time.perf_counter() - t_start
    machine["loadavg_end"] = machine_mod.loadavg()
    write(f"done in {elapsed:.0f} s; load {machine['loadavg_end']}")
    doc = {
        "schema": "fastconv-benchmarks/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "settings": {k: getattr(args, k) for k in (
            "threads", "dtypes", "modes", "libs", "cases", "repeats", "min_time",
            "max_repeats", "max_case_seconds", "warmup", "quick", "seed")},
        "machine": machine,
        "peers": peers,
        "peers_missing": peers_missing,
        "roofline": rooflines,
        "elapsed_s": round(elapsed, 1),
        "results": results,
    }
    if args.json:
        report.write_json(args.json, doc)
        write(f"wrote {args.json}")
    if args.png and report.plot(args.png, results, machine, write):
        write(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

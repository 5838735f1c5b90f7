"""The printed table, the JSON file and the PNG chart."""
import json
import math
import os

from .peers import PEERS, SHORT


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


class Table:
    """Rows printed as results arrive (a full run takes minutes), one block per
    (threads, dtype)."""

    def __init__(self, peers, write=print):
        self.peers = [p for p in PEERS if p in peers]
        self.write = write
        cols = [("case", 16, "<"), ("mode", 6, "<"), ("fc ms", 8, ">"), ("rate", 11, ">"),
                ("%roof", 5, ">")]
        cols += [(f"{SHORT[p]} ms", 8, ">") for p in self.peers]
        cols += [(f"{SHORT[p]}/fc", 6, ">") for p in self.peers]
        if {"torch", "onnxruntime"} & set(self.peers):
            cols.append(("best/fc", 7, ">"))
        cols.append(("fc MiB", 6, ">"))
        if "torch" in self.peers:
            cols.append(("torch MiB", 9, ">"))
        cols.append(("±%", 3, ">"))
        self.cols = cols

    def _line(self, values):
        return "  ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(values, self.cols))

    def header(self, threads, dtype, roof):
        r = roof.get("sgemm" if dtype == "float32" else "dgemm", {}).get("gflops")
        rs = f"{r:.1f} GFLOP/s" if r else "not measured"
        self.write("")
        self.write(f"== threads={threads}  dtype={dtype}  BLAS roofline "
                   f"({'sgemm' if dtype == 'float32' else 'dgemm'}): {rs}")
        self.write(self._line([c[0] for c in self.cols]))
        self.write(self._line(["-" * c[1] for c in self.cols]))

    def row(self, r):
        fc = r["libs"]["fastconv"]
        if fc.get("gflops") is not None:
            rate = f"{fc['gflops']:.1f} GF/s"
        elif fc.get("gbps") is not None:
            rate = f"{fc['gbps']:.1f} GB/s"
        else:
            rate = "-"
        roof = fc.get("roofline_frac")
        vals = [r["case"], r["mode"], _ms(fc.get("median_ms")), rate,
                "-" if roof is None else f"{100 * roof:.0f}%"]
        vals += [_ms(r["libs"].get(p, {}).get("median_ms")) for p in self.peers]
        vals += [_ratio(r["ratios"].get(p)) for p in self.peers]
        if {"torch", "onnxruntime"} & set(self.peers):
            vals.append(_ratio(r["ratios"].get("best_peer")))
        mem = fc.get("mem", {}).get("traced_peak")
        spread = None
        if fc.get("median_ms"):
            spread = 100 * (fc["p75_ms"] - fc["p25_ms"]) / fc["median_ms"]
        vals.append(_mib(mem))
        if "torch" in self.peers:
            vals.append(_mib(r["libs"].get("torch", {}).get("mem", {}).get("rss_peak_delta")))
        vals.append("-" if spread is None else f"{spread:.0f}")
        self.write(self._line(vals))


def geomean(values):
    vals = [v for v in values if v is not None and v > 0]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summary(results, write=print, slow_below=0.67):
    """Geometric means of the ratios per block, and the cases where fastconv is well behind
    its best peer."""
    write("")
    write("== summary (ratio = peer time / fastconv time; > 1: fastconv is faster)")
    blocks = {}
    for r in results:
        blocks.setdefault((r["threads"], r["dtype"]), []).append(r)
    for (t, dt), rs in blocks.items():
        parts = []
        for key in PEERS + ("best_peer",):
            g = geomean(r["ratios"].get(key) for r in rs)
            if g is not None:
                parts.append(f"{SHORT.get(key, 'best')} {g:.2f}x")
        write(f"threads={t} {dt}: geometric mean " + (", ".join(parts) or "-"))
    slow = [r for r in results if (r["ratios"].get("best_peer") or math.inf) < slow_below]
    if slow:
        write(f"fastconv slower than {slow_below:.2f}x of its best peer:")
        for r in slow:
            bp = r["best_peer"]
            write(f"  {r['case']:16s} {r['mode']:6s} threads={r['threads']} {r['dtype']}: "
                  f"{r['ratios']['best_peer']:.2f}x vs {bp} "
                  f"({r['libs']['fastconv']['median_ms']:.3f} ms vs "
                  f"{r['libs'][bp]['median_ms']:.3f} ms)")
    mismatched = [r for r in results for lib, v in r["libs"].items()
                  if v.get("check") == "MISMATCH"]
    if mismatched:
        write("outputs that disagree with fastconv's (see 'max_rel_err' in the JSON):")
        for r in mismatched:
            for lib, v in r["libs"].items():
                if v.get("check") == "MISMATCH":
                    err = v.get("max_rel_err")
                    write(f"  {r['case']} {r['mode']} threads={r['threads']} {r['dtype']} "
                          f"{lib}: max_rel_err "
                          + (f"{err:.2e}" if err is not None else "inf/nan/shape"))


def write_json(path, doc):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def plot(path, results, machine, write=print):
    """Horizontal bars of the best-peer ratio of every case, one panel per (threads, dtype);
    returns False (with a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - ImportError or a broken backend
        write(f"--png: matplotlib is not available ({type(e).__name__}: {e}); no chart drawn")
        return False
    blocks = {}
    for r in results:
        if r["ratios"].get("best_peer") is not None:
            blocks.setdefault((r["threads"], r["dtype"]), []).append(r)
    if not blocks:
        write("--png: no case has a PyTorch or ONNX Runtime time; no chart drawn")
        return False
    n = len(blocks)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    height = max(len(v) for v in blocks.values()) * 0.28 + 1.5
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, height * rows), squeeze=False)
    for ax, ((t, dt), rs) in zip(axes.flat, blocks.items()):
        labels = [f"{r['case']} {r['mode']}" for r in rs][::-1]
        vals = [r["ratios"]["best_peer"] for r in rs][::-1]
        peers = [SHORT.get(r["best_peer"], r["best_peer"]) for r in rs][::-1]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
        y = range(len(vals))
        ax.barh(list(y), vals, color=colors)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=8)
        for yi, v, p in zip(y, vals, peers):
            ax.text(v, yi, f" {v:.2f}x {p}", va="center", fontsize=7)
        ax.set_title(f"threads={t}, {dt}", fontsize=10)
        ax.set_xlabel("best peer time / fastconv time (> 1: fastconv faster)", fontsize=8)
        lo, hi = min(vals + [1.0]), max(vals + [1.0])
        ax.set_xlim(lo / 1.5, hi * 3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    v = machine.get("versions", {})
    fig.suptitle(f"fastconv {v.get('fastconv')} vs PyTorch {v.get('torch')} / ONNX Runtime "
                 f"{v.get('onnxruntime')} on {machine.get('cpu_model')} "
                 f"({machine.get('cpu_count')} CPUs)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

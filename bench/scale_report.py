"""The scale curves of ``bench_scale.py`` as RESULTS.md tables and an SVG plot.

Everything here is drawn from the numbers the bench stores (``bench/scale.json``): the
tables, a table of flatness ratios and the plot. No plotting library: log-log line charts
written as SVG text, one panel per curve, one line per system.
``python bench/scale_report.py [bench/scale.json]`` draws the SVG again (next to the JSON
file, same name) and prints the section.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from common import table

COLORS = {"durapipe": "#1f60b4", "raw DBOS": "#c62828", "LangGraph": "#2e8b3a"}
OTHER = ["#ef8a17", "#8e44ad", "#5d6d7e"]


def _color(name: str, i: int) -> str:
    """One colour per system; its variants (child workflows, 3-step, a map) are dashed."""
    return COLORS.get(name.split(",")[0].split(" (")[0], OTHER[i % len(OTHER)])


def _dashed(name: str) -> bool:
    return any(w in name for w in ("3-step", "child", "map of", "after"))


# -- the curves: (title, x label, y label, reference size, {series: [(x, y), ...]}) --------

Curve = tuple[str, str, str, int, dict[str, list[tuple[float, float]]]]


def curves(data: dict[str, Any]) -> list[Curve]:
    c = data.get("curves", {})
    out: list[Curve] = []
    if "length" in c:
        sizes = c["length"]["sizes"]
        out.append(("Pipeline length", "nodes", "ms per node", 100,
                    {k: [(n, v / n) for n, v in zip(sizes, ms, strict=True)] for k, ms in c["length"]["ms"].items()}))
    for body in ("1-step", "3-step"):
        cases = c.get("map", {}).get("cases", {}).get(body)
        if cases:
            out.append((f"map_over, {body} body", "items", "ms per item", 100,
                        {k: [(r["items"], r["ms"] / r["items"]) for r in rs if "ms" in r]
                         for k, rs in cases.items()}))
    if "fanout" in c:
        sizes = c["fanout"]["sizes"]
        out.append(("Fan-out width", "branches", "ms per branch", 8,
                    {k: [(w, v / w) for w, v in zip(sizes, ms, strict=True)] for k, ms in c["fanout"]["ms"].items()}))
    if "state" in c:
        sizes = c["state"]["sizes"]
        out.append(("State size", "state bytes", "bytes written / state byte", 100_000,
                    {k: [(s, b / s) for s, b in zip(sizes, bs, strict=True)] for k, bs in c["state"]["bytes"].items()}))
    return out


def threads_curve(data: dict[str, Any]) -> Curve | None:
    cases = data.get("curves", {}).get("map", {}).get("cases", {})
    series = {f"{k}, {body}": [(r["items"], float(r["threads"])) for r in rs if "threads" in r]
              for body, by in cases.items() for k, rs in by.items()}
    return ("map_over: peak threads (target ~50 at 10k)", "items", "threads", 0, series) \
        if series else None


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def flatness(data: dict[str, Any]) -> list[str]:
    """Per-unit cost at the largest size against the smallest and a reference size (where
    fixed costs stop dominating): the 1.5x target, row by row."""
    rows = []
    unfinished = {(f"map_over, {body} body", name): f"; {r['items']:,}: {r['error']}"
                  for body, by in data.get("curves", {}).get("map", {}).get("cases", {}).items()
                  for name, rs in by.items() for r in rs if "error" in r}
    for title, _, yl, ref, series in curves(data):
        for name, pts in series.items():
            if not pts:
                continue
            missing = unfinished.get((title, name), "")
            by = dict(pts)
            lo, hi = pts[0], pts[-1]
            r_lo = hi[1] / lo[1]
            r_ref = hi[1] / by[ref] if ref in by and ref != hi[0] else None
            worst = max(r_lo, r_ref or 0)
            rows.append([title, name, yl, f"{_fmt(lo[1])} @ {lo[0]:,}",
                         f"{_fmt(by[ref])} @ {ref:,}" if r_ref is not None else "",
                         f"{_fmt(hi[1])} @ {hi[0]:,}", f"{r_lo:.2f}x",
                         f"{r_ref:.2f}x" if r_ref is not None else "",
                         ("yes" if worst <= 1.5 and not missing else "**no**") + missing])
    return ["### Flatness: cost per unit at the largest size against the smallest and a middle size",
            "", "Target: per-node and per-item cost within 1.5x from the smallest to the largest "
            "size. A ratio below 1 means the per-unit cost falls (fixed costs spread over more "
            "work); the middle size is where fixed costs stop dominating.", "",
            table(rows, ["curve", "system", "unit", "smallest", "middle", "largest",
                         "largest / smallest", "largest / middle", "within 1.5x"]), ""]


# -- SVG ---------------------------------------------------------------------------------

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 380, 300, 58, 12, 28, 118


def _decades(lo: float, hi: float) -> tuple[float, float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return float(a), float(b if b > a else a + 1)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _label(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k" if v < 1_000_000 else f"{v / 1_000_000:g}M"
    return f"{v:g}"


def _panel(c: Curve, ox: float, oy: float) -> list[str]:
    title, xl, yl, _, series = c
    pts = [p for s in series.values() for p in s if p[1] > 0]
    if not pts:
        return []
    x0, x1 = _decades(min(p[0] for p in pts), max(p[0] for p in pts))
    y0, y1 = _decades(min(p[1] for p in pts), max(p[1] for p in pts))
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def X(x: float) -> float:
        return ox + PAD_L + (math.log10(x) - x0) / (x1 - x0) * pw

    def Y(y: float) -> float:
        return oy + PAD_T + ph - (math.log10(y) - y0) / (y1 - y0) * ph

    out = [f'<text x="{ox + W / 2}" y="{oy + 17}" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<rect x="{ox + PAD_L}" y="{oy + PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for e in range(int(x0), int(x1) + 1):
        x = X(10 ** e)
        out.append(f'<line x1="{x:.1f}" y1="{oy + PAD_T}" x2="{x:.1f}" y2="{oy + PAD_T + ph}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{oy + PAD_T + ph + 14}" text-anchor="middle">{_label(10.0 ** e)}</text>')
    for e in range(int(y0), int(y1) + 1):
        y = Y(10 ** e)
        out.append(f'<line x1="{ox + PAD_L}" y1="{y:.1f}" x2="{ox + PAD_L + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ox + PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end">{_label(10.0 ** e)}</text>')
    if "peak threads" in title and 10 ** y0 <= 50 <= 10 ** y1:  # the target
        out.append(f'<line x1="{ox + PAD_L}" y1="{Y(50):.1f}" x2="{ox + PAD_L + pw}" y2="{Y(50):.1f}" '
                   'stroke="#777" stroke-dasharray="2,3"/>')
        out.append(f'<text x="{ox + PAD_L + 4}" y="{Y(50) - 4:.1f}" fill="#555">50</text>')
    out.append(f'<text x="{ox + PAD_L + pw / 2}" y="{oy + PAD_T + ph + 30}" text-anchor="middle">{_esc(xl)}</text>')
    out.append(f'<text transform="translate({ox + 14},{oy + PAD_T + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{_esc(yl)}</text>')
    for i, (name, s) in enumerate(series.items()):
        s = [p for p in s if p[1] > 0]
        color = _color(name, i)
        dash = ' stroke-dasharray="5,3"' if _dashed(name) else ""
        if s:
            path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>' for x, y in s]
        ly = oy + PAD_T + ph + 46 + i * 13
        out.append(f'<line x1="{ox + PAD_L}" y1="{ly - 4}" x2="{ox + PAD_L + 22}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{ox + PAD_L + 28}" y="{ly}">{_esc(name)}</text>')
    return out


def svg(data: dict[str, Any]) -> str:
    panels = curves(data)
    t = threads_curve(data)
    if t:
        panels.append(t)
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    body = []
    for i, c in enumerate(panels):
        body += _panel(c, (i % cols) * W, (i // cols) * H)
    meta = data.get("meta", {})
    note = (f"bench_scale.py {'--quick ' if meta.get('quick') else ''}{meta.get('started', '')}; "
            "log-log; lower is cheaper, a flat line is linear cost")
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * W}" height="{rows * H + 20}" '
        f'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>', *body,
        f'<text x="6" y="{rows * H + 14}" fill="#555">{_esc(note)}</text>', "</svg>", ""])


def write_svg(data: dict[str, Any], path: Path) -> Path:
    path.write_text(svg(data))
    return path


# -- the RESULTS.md section ----------------------------------------------------------------

SYSTEMS = ("durapipe", "raw DBOS", "LangGraph")


def _rounds(c: dict[str, Any], i: int, n: int, meta: dict[str, Any]) -> int:
    if "rounds" in c:
        return int(c["rounds"][i])
    return 1 if n >= meta.get("one_round_from", 1000) else int(meta.get("rounds", 3))


def _lengths(c: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    rows = []
    for i, n in enumerate(c["sizes"]):
        t = {k: v[i] for k, v in c["ms"].items()}
        rows.append([str(n), str(_rounds(c, i, n, meta))]
                    + [f"{t[k]:.1f} ({t[k] / n:.2f})" for k in t]
                    + [f"{t['durapipe'] / t['raw DBOS']:.2f}x", f"{t['durapipe'] / t['LangGraph']:.2f}x"])
    return ["### Pipeline length: ms per run (ms per node)", "",
            table(rows, ["nodes", "rounds", "durapipe", "raw DBOS", "LangGraph", "durapipe / DBOS",
                         "durapipe / LangGraph"]), ""]


def _maps(c: dict[str, Any]) -> list[str]:
    rows = []
    for body, by in c["cases"].items():
        sizes = sorted({r["items"] for rs in by.values() for r in rs})
        for n in sizes:
            for name in [s for s in SYSTEMS if s in by] + [s for s in by if s not in SYSTEMS]:
                for r in (r for r in by[name] if r["items"] == n):
                    if "error" in r:
                        rows.append([f"{body} body", f"{n:,}", name, "1", r["error"], "", "", "", ""])
                    else:
                        rows.append([f"{body} body", f"{n:,}", name, str(r["rounds"]), f"{r['ms']:,.0f}",
                                     f"{r['ms'] / n:.2f}", str(r["threads"]), str(r["conns"]),
                                     str(r.get("pool_timeouts", ""))])
    return ["### `map_over`: ms per map, ms per item, peak threads and connections", "",
            "Each row in a process of its own: threads are the process's peak (DBOS's and "
            "LangGraph's background threads included), connections the database's sessions "
            "at peak (idle pooled ones included, the sampler's own excluded); \"timeouts\" "
            "counts the mentions of a timeout in the case's stderr (DBOS's pool waits).", "",
            table(rows, ["body", "items", "system", "rounds", "median ms", "ms / item",
                         "peak threads", "peak connections", "timeouts"]), ""]


def _fanouts(c: dict[str, Any], par: dict[str, Any] | None, meta: dict[str, Any]) -> list[str]:
    rows = []
    for i, w in enumerate(c["sizes"]):
        t = {k: v[i] for k, v in c["ms"].items()}
        rows += [[str(w), k, f"{v:.1f}", f"{v / w:.2f}", f"{t['durapipe'] / v:.2f}x"] for k, v in t.items()]
    if par:
        t = par["ms"]
        rows += [["3 x 3 steps", k, f"{v:.1f}", f"{v / 3:.2f}", f"{t['durapipe'] / v:.2f}x"]
                 for k, v in t.items()]
    return ["### Fan-out width (one-step branches, then a join): ms per run", "",
            f"Median of {c.get('rounds', meta.get('rounds', 3))} interleaved rounds at every width "
            f"({par.get('rounds', 9) if par else ''} for 3 x 3). The last rows are 3 branches of 3 "
            "steps then a join. Gathering one coroutine per "
            "branch inside one workflow numbers the steps in the order they happen to start, "
            "which a DBOS replay does not tolerate; it is listed as the cheapest form, not a "
            "safe one.", "",
            table(rows, ["width", "system", "median ms", "ms / branch", "durapipe / this"]), ""]


def _states(c: dict[str, Any]) -> list[str]:
    rows = [[f"{size:,}", name, f"{bs[i]:,}", f"{bs[i] / size:.1f}"]
            for i, size in enumerate(c["sizes"]) for name, bs in c["bytes"].items()]
    return ["### State size: bytes written per run", "",
            table(rows, ["state bytes", "system", "bytes written", "x state"]), ""]


def _statements(c: dict[str, Any]) -> list[str]:
    n, t, counts = c["nodes"], c["ms"], c["statements"]
    rows = [[k, str(counts[k]), f"{t[k]:.1f}", f"{t[k] / n:.3f}"] for k in t]
    ratio = t["one statement per new step"] / t["check + record per step"]
    return [f"### Statements per durable step ({n} sequential no-op nodes, not replaying)", "",
            table(rows, ["step path", "statements per run", "median ms", "ms per node"]), "",
            f"One statement per new step / check + record: **{ratio:.2f}x** of the time.", ""]


def _when(c: dict[str, Any]) -> str:
    return f" Measured {c['at']}, load {c['load_before']} before, {c['load_after']} after." \
        if "at" in c else ""


def render(data: dict[str, Any], svg_name: str = "scale.svg") -> str:
    """The "Scale curves" section of RESULTS.md from the stored numbers."""
    meta, c = data.get("meta", {}), data.get("curves", {})
    out = ["## Scale curves: durapipe, hand-written DBOS, LangGraph", "",
           f"{'Reduced sizes (`--quick`). ' if meta.get('quick') else ''}Run "
           f"{meta.get('started', '?')} to {meta.get('finished', '?')} (1-minute load average "
           f"{meta.get('load_before', '?')} before, {meta.get('load_after', '?')} after; each "
           "curve's own time and load are under its table). Median of "
           f"{meta.get('rounds', 3)} interleaved rounds after a warm-up; map sizes of "
           f"{meta.get('one_round_from', 1000):,} items and more are timed once after the "
           "warm-up (rounds column). One process, one Postgres; LangGraph on `PostgresSaver` "
           "with `durability=\"sync\"`. Hand-written DBOS in its fastest idiomatic form "
           "(async steps; `asyncio.gather` of async steps; child workflows joined with "
           "`handle.get_result()`). The numbers are in `bench/scale.json`; "
           "`python bench/scale_report.py` draws the plot and these tables again.", "",
           f"![cost per node, item, branch and state byte against size, log-log]({svg_name})", ""]
    out += flatness(data)
    parts: list[tuple[str, list[str]]] = []
    if "length" in c:
        parts.append(("length", _lengths(c["length"], meta)))
    if "map" in c:
        parts.append(("map", _maps(c["map"])))
    if "fanout" in c:
        parts.append(("fanout", _fanouts(c["fanout"], c.get("par3x3"), meta)))
    if "state" in c:
        parts.append(("state", _states(c["state"])))
    if "statements" in c:
        parts.append(("statements", _statements(c["statements"])))
    for key, lines in parts:
        when = _when(c[key])
        out += lines + ([when.strip(), ""] if when else [])
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "scale.json"
    data = json.loads(src.read_text())
    svg_path = write_svg(data, src.with_suffix(".svg"))
    print(render(data, svg_path.name))

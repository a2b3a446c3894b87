#!/usr/bin/env python3
"""Draws docs/benchmarks.svg from benches/compare/results.json (written by run.py).

Plain SVG written by hand, so no plotting library is needed:

    python3 benches/compare/plot.py [results.json] [out.svg]
"""
from __future__ import annotations

import json
import math
import sys
from html import escape
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

COLORS = {"fieldcrypt": "#1f6fb4", "libmongocrypt": "#3b9b48", "quoted": "#a8d5ad",
          "python": "#e07b29", "baseline": "#9a9a9a"}
WIDTH, LEFT, RIGHT, BAR, GAP = 900, 330, 70, 20, 6


def med(run: dict) -> float:
    return run["documents_per_second"]["median"]


def first(runs: list, threads: int = 1):
    return next((r for r in runs if r["threads"] == threads), None)


def w1_bars(res: dict) -> list:
    bars = []
    fc = res.get("fieldcrypt", {}).get("w1", {})
    for fmt in ("AES-256-GCM", "AES-256-SIV-deterministic", "ChaCha20-Poly1305",
                "XChaCha20-Poly1305", "csfle"):
        r = first(fc.get(fmt, []))
        if r:
            label = "fieldcrypt, CSFLE deterministic" if fmt == "csfle" else f"fieldcrypt, {fmt}"
            bars.append((label, med(r), "fieldcrypt"))
    ref = res.get("native_libmongocrypt_reference")
    native_run = any((res.get(k) or {}).get("native_crypto")
                     for k in ("libmongocrypt", "libmongocrypt_wheel"))
    if ref and not native_run:
        bars.append((f"libmongocrypt {ref['version']} native (quoted)",
                     ref["documents_per_second"], "quoted"))
    py = res.get("python", {})
    for kind, name in (("aesgcm", "AES-GCM"), ("fernet", "Fernet")):
        if kind in py and first(py[kind]["w1"]):
            bars.append((f"Python cryptography {name} per field", med(first(py[kind]["w1"])),
                         "python"))
    for key in ("libmongocrypt", "libmongocrypt_wheel"):
        lm = res.get(key)
        if lm and first(lm["runs"]):
            kind = ("native, OpenSSL, this run" if lm.get("native_crypto")
                    else "pymongocrypt wheel, Python crypto")
            bars.append((f"libmongocrypt {lm['libmongocrypt']} ({kind})",
                         med(first(lm["runs"])), "libmongocrypt"))
    return bars


def w2_bars(res: dict) -> list:
    bars = []
    fc = res.get("fieldcrypt", {}).get("w2", {}).get("1", {})
    py = res.get("python", {})
    for op in ("encrypt", "decrypt"):
        if f"{op}_raw" in fc:
            bars.append((f"fieldcrypt AES-256-GCM, {op} (raw)", med(fc[f"{op}_raw"]), "fieldcrypt"))
        for kind, name in (("aesgcm", "AES-GCM"), ("fernet", "Fernet")):
            if kind in py:
                bars.append((f"Python {name} per field, {op}", med(py[kind]["w2"][op]), "python"))
    return bars


def w4_bars(res: dict) -> tuple[list, list, str]:
    """The largest W4 size: rotation and its two plain baselines, documents/s."""
    sizes = res.get("fieldcrypt", {}).get("w4", {}).get("results", [])
    if not sizes:
        return [], [], ""
    size = max(sizes, key=lambda s: s["documents"])
    p = size["passes"]
    rate = lambda name: p[name]["documents_per_second"]["median"]  # noqa: E731
    bars = [("fieldcrypt rotation (Rotator::run)", rate("rotate"), "fieldcrypt"),
            ("plain rewrite: the same writes, no crypto", rate("rewrite"), "baseline"),
            ("plain copy: read + insert_many", rate("copy"), "baseline")]
    return bars, [("rotation ≤ 1.2× a plain copy", rate("copy") / 1.2)], f"{size['documents']:,}"


def panel(title: str, bars: list, y: int, targets: list) -> tuple[list, int]:
    """Horizontal bars on a log axis; returns the SVG elements and the height used."""
    out = [f'<text x="{LEFT - 320}" y="{y + 16}" class="title">{escape(title)}</text>']
    y += 30
    vals = [v for _, v, _ in bars] + [t for _, t in targets]
    lo = 10 ** math.floor(math.log10(max(min(vals), 1e-9)))
    hi = 10 ** math.ceil(math.log10(max(vals) * 1.05))
    span = WIDTH - LEFT - RIGHT

    def x(v: float) -> float:
        return LEFT + span * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    height = len(bars) * (BAR + GAP)
    d = lo
    while d <= hi * 1.0001:
        out.append(f'<line x1="{x(d):.1f}" y1="{y - 4}" x2="{x(d):.1f}" y2="{y + height}" class="grid"/>')
        out.append(f'<text x="{x(d):.1f}" y="{y + height + 14}" class="axis">{d:,.0f}</text>')
        d *= 10
    for i, (name, t) in enumerate(targets):
        below = y + height + 28 + 12 * i
        out.append(f'<line x1="{x(t):.1f}" y1="{y - 4}" x2="{x(t):.1f}" y2="{below - 9}" class="target"/>')
        # Labels near the right edge run leftwards from their line.
        anchor, dx = ("end", -3) if x(t) > WIDTH - 260 else ("start", 3)
        out.append(f'<text x="{x(t) + dx:.1f}" y="{below}" text-anchor="{anchor}" '
                   f'class="tlabel">target: {escape(name)}</text>')
    for i, (label, v, kind) in enumerate(bars):
        top = y + i * (BAR + GAP)
        out.append(f'<text x="{LEFT - 8}" y="{top + BAR * 0.72:.1f}" class="label">{escape(label)}</text>')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{max(x(v) - LEFT, 1):.1f}" height="{BAR}" '
                   f'fill="{COLORS[kind]}"/>')
        out.append(f'<text x="{x(v) + 4:.1f}" y="{top + BAR * 0.72:.1f}" class="value">{v:,.0f}</text>')
    return out, height + 30 + 30 + 12 * len(targets)


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "docs/benchmarks.svg"
    res = json.loads(src.read_text())
    ref = res.get("native_libmongocrypt_reference", {}).get("documents_per_second", 127)
    body, y = [], 40
    el, h = panel("W1 bulk decrypt (MongoDB's benchmark, 1500 encrypted fields), one thread — documents/s",
                  w1_bars(res), y + 10, [(f"CSFLE ≥ 7× native libmongocrypt = {7 * ref:,.0f}", 7 * ref), ("AES-256-GCM ≥ 3,000", 3000)])
    body += el
    y += h + 20
    el, h = panel("W2 user documents (3 encrypted fields), one core — documents/s",
                  w2_bars(res), y, [("≥ 400,000 per core, raw path", 400_000)])
    body += el
    y += h
    bars, targets, n = w4_bars(res)
    if bars:
        y += 20
        el, h = panel(f"W4 key rotation of a {n}-document collection on the test server — documents/s",
                      bars, y, targets)
        body += el
        y += h
    m = res.get("machine", {})
    load = res.get("load_average_1m", {})
    note = (f"{m.get('cpu_model') or 'CPU'}, {m.get('cpus')} CPUs; median of {res['params']['trials']} "
            f"trials × {res['params']['seconds']} s; load average {load.get('start') or 0:.1f}→"
            f"{load.get('end') or 0:.1f} (shared, noisy machine); fieldcrypt {res.get('fieldcrypt_commit')}")
    body.append(f'<text x="10" y="{y}" class="note">{escape(note)}</text>')
    legend_y = 22
    lx = 10
    for kind, name in (("fieldcrypt", "fieldcrypt"), ("libmongocrypt", "libmongocrypt, this run"),
                       ("quoted", "libmongocrypt native, quoted"), ("python", "Python cryptography"),
                       ("baseline", "plain baseline")):
        body.append(f'<rect x="{lx}" y="{legend_y - 10}" width="12" height="12" fill="{COLORS[kind]}"/>')
        body.append(f'<text x="{lx + 16}" y="{legend_y}" class="legend">{escape(name)}</text>')
        lx += 40 + 7 * len(name)
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y + 16}" viewBox="0 0 {WIDTH} {y + 16}" font-family="Helvetica, Arial, sans-serif">
<style>
.title {{ font-size: 14px; font-weight: bold; fill: #222; }}
.label {{ font-size: 12px; text-anchor: end; fill: #222; }}
.value {{ font-size: 11px; fill: #222; paint-order: stroke; stroke: white; stroke-width: 3px; }}
.axis {{ font-size: 10px; text-anchor: middle; fill: #555; }}
.grid {{ stroke: #ddd; stroke-width: 1; }}
.target {{ stroke: #c0392b; stroke-width: 1.5; stroke-dasharray: 4 3; }}
.tlabel {{ font-size: 10px; fill: #c0392b; }}
.legend {{ font-size: 12px; fill: #222; }}
.note {{ font-size: 10px; fill: #555; }}
</style>
<rect width="100%" height="100%" fill="white"/>
{chr(10).join(body)}
</svg>
"""
    dst.write_text(svg)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()

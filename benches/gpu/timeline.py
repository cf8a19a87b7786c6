"""Reads a device timeline written by cupti_trace.cpp and sums it up per decode step.

    python3 benches/gpu/timeline.py RUN.csv STEPS     # prints the summary as JSON

Only the records inside the first window the switch file opened count. For that window:
- `gpu_span_us`: first kernel, copy or memset start to the last one's end;
- `gpu_busy_us`: time the GPU ran at least one of them (the union of their intervals);
- `gpu_idle_us`: span minus busy, and how much of it falls in gaps of 20 us or more (the GPU
  waiting on the host rather than between back-to-back kernels);
- per kernel name: launches and GPU time, per step;
- per driver call: calls and host time, per step;
- copies and memsets: count and bytes, per step.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def read(path):
    names = {}
    with open(path + ".names") as f:
        for line in f:
            i, _, n = line.rstrip("\n").partition("\t")
            names[int(i)] = n
    marks, kernels, copies, sets, driver = [], [], [], [], []
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split(",")
            if p[0] == "K":
                kernels.append((int(p[1]), int(p[2]), int(p[3])))
            elif p[0] == "D":
                driver.append((int(p[1]), int(p[2]), int(p[3])))
            elif p[0] == "C":
                copies.append((int(p[1]), int(p[2]), int(p[3]), int(p[4])))
            elif p[0] == "S":
                sets.append((int(p[1]), int(p[2]), int(p[3])))
            elif p[0] == "M":
                marks.append((int(p[1]), p[2] == "1"))
    return names, marks, kernels, copies, sets, driver


def window(marks):
    start = next((t for t, on in marks if on), None)
    if start is None:
        raise ValueError("the switch file never appeared: no window")
    end = next((t for t, on in marks if not on and t > start), None)
    if end is None:
        raise ValueError("the switch file never went: the window has no end")
    return start, end


def summary(path, steps, top=25):
    names, marks, kernels, copies, sets, driver = read(path)
    lo, hi = window(marks)
    inside = lambda r: lo <= r[0] and r[1] <= hi  # noqa: E731
    kernels = [k for k in kernels if inside(k)]
    copies = [c for c in copies if inside(c)]
    sets = [s for s in sets if inside(s)]
    driver = [d for d in driver if inside(d)]
    gpu = sorted([(k[0], k[1]) for k in kernels] + [(c[0], c[1]) for c in copies] + [(s[0], s[1]) for s in sets])
    if not gpu:
        raise ValueError("no GPU work inside the window")
    busy, idle_big, big_gaps = 0, 0, 0
    cur_s, cur_e = gpu[0]
    for s, e in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gap = s - cur_e
            if gap >= 20_000:
                idle_big += gap
                big_gaps += 1
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = gpu[-1][1] - gpu[0][0]
    per = lambda x: round(x / steps / 1000, 2)  # noqa: E731  ns in total -> us per step
    by_kernel = defaultdict(lambda: [0, 0])
    for s, e, n in kernels:
        by_kernel[n][0] += 1
        by_kernel[n][1] += e - s
    by_call = defaultdict(lambda: [0, 0])
    for s, e, n in driver:
        by_call[n][0] += 1
        by_call[n][1] += e - s
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])
    return {
        "steps": steps,
        "gpu_span_us": per(span), "gpu_busy_us": per(busy), "gpu_idle_us": per(span - busy),
        "gpu_idle_in_gaps_of_20us_or_more_us": per(idle_big), "gaps_of_20us_or_more": round(big_gaps / steps, 2),
        "kernels": round(len(kernels) / steps, 2), "kernel_us": per(sum(e - s for s, e, _ in kernels)),
        "copies": round(len(copies) / steps, 2), "copy_bytes": round(sum(c[2] for c in copies) / steps),
        "copy_us": per(sum(c[1] - c[0] for c in copies)),
        "memsets": round(len(sets) / steps, 2), "memset_us": per(sum(s[1] - s[0] for s in sets)),
        "top_kernels": [{"name": names.get(n, "?")[:160], "per_step": round(c / steps, 2), "us_per_step": per(t),
                         "mean_us": round(t / c / 1000, 2)} for n, (c, t) in ranked[:top]],
        "driver_calls": [{"name": names.get(n, "?"), "per_step": round(c / steps, 2), "host_us_per_step": per(t)}
                         for n, (c, t) in sorted(by_call.items(), key=lambda kv: -kv[1][1])[:15]],
    }


if __name__ == "__main__":
    print(json.dumps(summary(sys.argv[1], int(sys.argv[2])), indent=1))

"""Rewrite one marked results section of docs/BENCHMARKS.md (other sections are left alone)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HEADER = ("# Benchmarks\n\nResults written by `gps-ds bench ...  --write docs/BENCHMARKS.md`; each section is "
          "rewritten in place by the command that produced it (markers `<!-- bench:... -->`).\n")


def machine_lines(m: dict[str, Any]) -> str:
    load = m.get("load_average_before"), m.get("load_average_after")
    parts = [f"CPU: {m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} torch threads; torch {m.get('torch')}"]
    if m.get("gpu"):
        parts.append(f"GPU: {m['gpu']}")
    if m.get("cpu_gather_kernel"):
        parts.append(f"selected-entry gradients (gather path): {m['cpu_gather_kernel']}")
    parts.append(f"load average (1/5/15 min) before: {load[0]}, after: {load[1]}")
    other = m.get("other_load_cores")
    if other is not None:
        parts.append(f"other processes used {other:.2f} cores on average during the run (machine busy time "
                     f"minus the benchmark's own CPU time)")
        busy = other
    else:  # older results: only the load average before the run excludes the benchmark itself
        busy = (load[0] or [0])[0]
    if m.get("cores") and busy > 0.25 * m["cores"]:
        parts.append("**The machine was loaded by other jobs: wall-clock times are unreliable "
                     "(process CPU time is steadier, memory and state bytes are unaffected).**")
    return "\n".join(f"* {p}" for p in parts)


def write_section(path: str | Path, key: str, title: str, body: str) -> Path:
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path

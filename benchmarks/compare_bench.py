"""One Markdown table of several `split-unet bench` results (before / after a change), with the federation's
figures: CPU seconds per step of all its processes minus centralized's, and MB per such CPU second. Results of
a benchmark older than these figures are completed from their CPU seconds and bytes per step.

    python benchmarks/compare_bench.py before=runs/bench/base/bench.json after=runs/bench/new/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from split_unet.launch.benchmark import federation_figures


def rows(label: str, path: Path) -> list[str]:
    result = json.loads(path.read_text())
    modes = result["modes"]
    central = modes.get("centralized")
    lines = []
    for mode, row in modes.items():
        if "error" in row:
            lines.append(f"| {label} | {mode} | error: {row['error'][:80]} |||||||")
            continue
        cpu = row["cpu_seconds_per_step"]
        by_process = row.get("cpu_seconds_per_step_by_process", {})
        relays = sum(v for k, v in by_process.items() if k.startswith("relay"))
        sites = result["config"]["sites"]  # older results: both directions of the largest site, times the sites
        megabytes = row.get("bytes_per_step", sum(row.get("bytes_per_step_per_site", {}).values()) * sites) / 1e6
        figures = (federation_figures({**row, "bytes_per_step": megabytes * 1e6}, central)
                   if central and row is not central else {})
        memory = row["peak_memory_mb"]
        peak = memory.get("process") or f"{memory['server']:.0f} / {memory['site']:.0f}"
        resident = row.get("server_resident_mb") or []
        growth = f"{resident[0]:.0f} -> {resident[-1]:.0f}" if resident else "-"
        lines.append(f"| {label} | {mode} | {row['step_seconds']['median']:.3f} | {cpu:.2f} | "
                     f"{relays:.2f} | {figures.get('federation_cpu_seconds_per_step', '-')} | "
                     f"{megabytes if mode != 'centralized' else 0:.1f} | "
                     f"{figures.get('mb_per_federation_cpu_second') or '-'} | {peak} | {growth} |")
    return lines


def main(arguments: list[str]) -> None:
    lines = ["| run | mode | s/step median | CPU s/step (all processes) | of which NVFlare relays | federation CPU "
             "s/step | MB/step | MB per federation CPU s | peak MB server / site | server RSS first -> last step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for argument in arguments:
        label, _, path = argument.partition("=")
        lines += rows(label, Path(path))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

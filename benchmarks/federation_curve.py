"""The whole federation's bytes per CPU second against the payload of a step: one point per
``split-unet bench`` result, for the simulator and POC, from the CPU seconds per step of all their processes minus
the centralized run's (``federation_figures``).

Each point is ``LABEL=BENCH_JSON[,BENCH_JSON...]``: the modes of several results of the same configuration are merged
(a later file's mode replaces an earlier one's), so a centralized reference and a POC run taken in the same hour by
separate commands make one point.

    python benchmarks/federation_curve.py --out docs/performance/federation_curve \\
        64=runs/bench/default/bench.json 96=runs/bench/size96/bench.json \\
        128=runs/bench/size128/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from split_unet.launch.benchmark import federation_figures  # noqa: E402

FEDERATED = ("simulator", "poc")
TARGET_MB_PER_CPU_SECOND = 450  # the federation's target: bytes moved per CPU second it spends


def merged_modes(paths: list[Path]) -> dict:
    modes = {}
    for path in paths:
        modes.update(json.loads(path.read_text())["modes"])
    return modes


def points(arguments: list[str]) -> list[dict]:
    found = []
    for argument in arguments:
        label, _, files = argument.partition("=")
        modes = merged_modes([Path(f) for f in files.split(",")])
        central = modes.get("centralized")
        if central is None or "error" in central:
            raise SystemExit(f"{label}: no centralized reference among {files}")
        for mode in FEDERATED:
            row = modes.get(mode)
            if row is None or "error" in row:
                continue
            figures = federation_figures(row, central)
            found.append({"point": label, "mode": mode, "mb_per_step": round(row["bytes_per_step"] / 1e6, 1),
                          "step_seconds": row["step_seconds"]["median"],
                          "ratio_to_centralized": round(row["step_seconds"]["median"]
                                                        / central["step_seconds"]["median"], 2),
                          "cpu_seconds_per_step": row["cpu_seconds_per_step"],
                          "centralized_cpu_seconds_per_step": central["cpu_seconds_per_step"], **figures})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.png and OUT.md")
    parser.add_argument("points", nargs="+", help="LABEL=BENCH_JSON[,BENCH_JSON...]")
    args = parser.parse_args()
    found = points(args.points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(found, indent=2))
    lines = ["| point | mode | MB/step | s/step | x centralized | CPU s/step (centralized) | federation CPU s/step | "
             "MB per federation CPU s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['point']} | {p['mode']} | {p['mb_per_step']} | {p['step_seconds']:.3f} | "
              f"{p['ratio_to_centralized']:.2f} | {p['cpu_seconds_per_step']:.2f} "
              f"({p['centralized_cpu_seconds_per_step']:.2f}) | {p['federation_cpu_seconds_per_step']} | "
              f"{p['mb_per_federation_cpu_second'] or '-'} |" for p in found]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for mode in FEDERATED:
        mine = [p for p in found if p["mode"] == mode and p["mb_per_federation_cpu_second"]]
        axis.plot([p["mb_per_step"] for p in mine], [p["mb_per_federation_cpu_second"] for p in mine], "o-",
                  label=mode)
        for p in mine:
            axis.annotate(p["point"], (p["mb_per_step"], p["mb_per_federation_cpu_second"]), fontsize=8,
                          textcoords="offset points", xytext=(4, 4))
    axis.axhline(TARGET_MB_PER_CPU_SECOND, color="grey", linestyle="--", label="target")
    axis.set(xscale="log", xlabel="tensor MB per training step (all sites, both directions)",
             ylabel="MB per federation CPU second", title="The whole federation: bytes per CPU second")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

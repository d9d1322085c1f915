"""The server's memory across steps, epochs and patients: one `split-unet bench` (simulator) per point, one after
another on this machine; then ``memory_curve.json`` and ``memory_curve.png`` (the server's resident memory after
every training step of every point, its peak as a dashed line, the 2 GB target).

    python benchmarks/memory_curve.py --out runs/bench/memory --docs docs/performance

The points differ in patients (the validation quarter and the steps per epoch grow with them) and in epochs; the
step itself (batch, grid, network, sites) is the same, so a flat server is one whose memory does not follow them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from split_unet.launch.benchmark import BenchConfig, bench  # noqa: E402

BASE = BenchConfig(size=64, sites=4, batch_size=2)
POINTS = ((24, 3), (72, 1), (200, 1))  # (patients, epochs)
TARGET_MB = 2000


def run_points(out: Path, points=POINTS, mode: str = "simulator", again: bool = False,
               data_root: Path | None = None) -> list[dict]:
    """[{patients, epochs, row}] with the bench row of each point; points already measured are read back.
    ``data_root``: where the phantom sets are made and reused (default ``out/data``)."""
    data_root = data_root or out / "data"
    results = []
    for patients, epochs in points:
        folder = out / f"{mode}_{patients}p_{epochs}e"
        if again or not (folder / "bench.json").is_file():
            bench(folder, dataclasses.replace(BASE, patients=patients, epochs=epochs), (mode,), data_root=data_root)
        row = json.loads((folder / "bench.json").read_text())["modes"][mode]
        results.append({"patients": patients, "epochs": epochs, "row": row})
    return results


def plot(results: list[dict], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for point in results:
        row = point["row"]
        if "error" in row:
            continue
        resident = row["server_resident_mb"]
        line, = axis.plot(range(1, len(resident) + 1), resident, marker=".", linewidth=1,
                          label=f"{point['patients']} patients, {point['epochs']} epoch(s): step-end resident")
        axis.axhline(row["peak_memory_mb"]["server"], color=line.get_color(), linestyle="--", linewidth=1,
                     label=f"{point['patients']} patients: peak {row['peak_memory_mb']['server']:.0f} MB")
    axis.axhline(TARGET_MB, color="red", linewidth=1, label="target 2 GB")
    axis.set_xlabel("training step")
    axis.set_ylabel("server process memory (MB)")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title(f"Server memory, simulator, {BASE.size}^3, {BASE.sites} sites, batch {BASE.batch_size}, "
                   f"float16 wire")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def table(results: list[dict]) -> str:
    lines = ["| patients | epochs | steps | server step-end resident MB: first / min / max / last | server peak MB | "
             "site peak MB | s/step median |", "|---|---|---|---|---|---|---|"]
    for point in results:
        row = point["row"]
        if "error" in row:
            lines.append(f"| {point['patients']} | {point['epochs']} | error: {row['error']} ||||")
            continue
        resident = row["server_resident_mb"]
        lines.append(f"| {point['patients']} | {point['epochs']} | {len(resident)} | {resident[0]:.0f} / "
                     f"{min(resident):.0f} / {max(resident):.0f} / {resident[-1]:.0f} | "
                     f"{row['peak_memory_mb']['server']:.0f} | {row['peak_memory_mb']['site']:.0f} | "
                     f"{row['step_seconds']['median']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/memory")
    parser.add_argument("--docs", help="also write memory_curve.json / memory_curve.png here")
    parser.add_argument("--mode", default="simulator", choices=("simulator", "poc"))
    parser.add_argument("--again", action="store_true", help="rerun points that already have a bench.json")
    parser.add_argument("--data-root", type=Path, help="where phantom data sets are made and reused (default OUT/data)")
    args = parser.parse_args()
    out = Path(args.out)
    results = run_points(out, mode=args.mode, again=args.again, data_root=args.data_root)
    print(table(results))
    target = Path(args.docs) if args.docs else out
    target.mkdir(parents=True, exist_ok=True)
    (target / "memory_curve.json").write_text(json.dumps(results, indent=2))
    print(f"plot: {plot(results, target / 'memory_curve.png')}")


if __name__ == "__main__":
    main()

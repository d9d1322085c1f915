"""How the cost of split learning grows with the volume size, the batch size and the number of sites.

One `split-unet bench` (centralized late fusion and the NVFlare simulator, one epoch) per point, one after another
on this machine; then ``scaling.json`` and ``scaling.png`` (seconds per step against each variable, both modes,
the ratio written at each point).

    python benchmarks/scaling.py --out runs/bench/scaling --docs docs/performance
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

BASE = BenchConfig(size=64, patients=24, sites=4, batch_size=2, epochs=1)
CURVES = {"size": (32, 64, 96), "batch_size": (1, 2, 4), "sites": (2, 4, 8)}
MODES = ("centralized", "simulator")
LABELS = {"size": "volume edge (voxels)", "batch_size": "batch size", "sites": "sites (encoders)"}


def run_curves(out: Path, again: bool = False) -> dict:
    """{curve: [{value, modes: {mode: bench row}}]}; points already measured are read back."""
    results = {}
    for variable, values in CURVES.items():
        results[variable] = []
        for value in values:
            config = dataclasses.replace(BASE, **{variable: value})
            # Named by the whole point, so the point the curves share is measured once.
            folder = out / f"size{config.size}_batch{config.batch_size}_sites{config.sites}"
            if again or not (folder / "bench.json").is_file():
                bench(folder, config, MODES, data_root=out / "data")
            measured = json.loads((folder / "bench.json").read_text())
            results[variable].append({"value": value, "modes": measured["modes"]})
    return results


def plot(results: dict, path: Path) -> Path:
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for axis, (variable, points) in zip(axes, results.items()):
        values = [point["value"] for point in points]
        for mode in MODES:
            seconds = [point["modes"][mode]["step_seconds"]["median"] for point in points]
            axis.plot(values, seconds, marker="o", label=mode)
        for point in points:
            simulator = point["modes"]["simulator"]
            axis.annotate(f"x{simulator['ratio_to_centralized']:.1f}",
                          (point["value"], simulator["step_seconds"]["median"]), textcoords="offset points",
                          xytext=(4, 6), fontsize=8)
        axis.set_xlabel(LABELS[variable])
        axis.set_ylabel("seconds per training step (median)")
        axis.set_xticks(values)
        axis.margins(x=0.12, y=0.12)  # room for the ratio labels
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Split-U-Net on {BASE.patients} phantoms, CPU; others fixed at size {BASE.size}, "
                    f"batch {BASE.batch_size}, {BASE.sites} sites (xN: simulator / centralized)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def table(results: dict) -> str:
    lines = ["| varied | value | centralized s/step | simulator s/step | ratio | MB/step/site each way | "
             "peak MB server / site |", "|---|---|---|---|---|---|---|"]
    for variable, points in results.items():
        for point in points:
            central, simulator = point["modes"]["centralized"], point["modes"]["simulator"]
            lines.append(f"| {variable} | {point['value']} | {central['step_seconds']['median']:.3f} | "
                         f"{simulator['step_seconds']['median']:.3f} | {simulator['ratio_to_centralized']:.2f} | "
                         f"{simulator['bytes_per_step_per_site']['to_server'] / 1e6:.1f} | "
                         f"{simulator['peak_memory_mb']['server']:.0f} / {simulator['peak_memory_mb']['site']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/scaling")
    parser.add_argument("--docs", help="also write scaling.md / scaling.json / scaling.png here")
    parser.add_argument("--again", action="store_true", help="rerun points that already have a bench.json")
    args = parser.parse_args()
    out = Path(args.out)
    results = run_curves(out, args.again)
    text = table(results)
    print(text)
    target = Path(args.docs) if args.docs else out
    target.mkdir(parents=True, exist_ok=True)
    (target / "scaling.json").write_text(json.dumps(results, indent=2))
    (target / "scaling.md").write_text(f"# Scaling\n\n{BASE}\n\n{text}\n\n![scaling](scaling.png)\n")
    print(f"plot: {plot(results, target / 'scaling.png')}")


if __name__ == "__main__":
    main()

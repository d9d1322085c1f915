"""Native resolution on the native-geometry phantom (BraTS 2023 layout, 240 x 240 x 155 at 1 mm).

1. ``steps``: seconds and bytes per training step per site at patch 64^3, 96^3 and 128^3, through the NVFlare
   simulator (float16 on the wire, the default network, batch 2).
2. ``budget``: whole volumes at a coarse spacing (3.75 mm: the 240 mm field of view in 64 voxels) against 1 mm
   patches of 64^3 with augmentation, each for its own number of epochs (``--epochs`` for both, or
   ``--epochs-coarse`` / ``--epochs-patches`` chosen from the step costs so that both take about the same wall
   time, validation included); both segment the validation patients by split inference and are scored in source
   space (the files written, against the source labels: global and lesion-wise Dice, HD95 in mm). Wall times as
   measured.

    python benchmarks/native.py --out runs/native --docs docs/performance [--patients 16] [--epochs 6]

Writes ``native.json`` and ``native.md`` to ``--out`` (and ``--docs``); steps already measured are read back.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from split_unet.data import find_cases, generate_release, partition_dataset, split_patients
from split_unet.files import load_json, write_json
from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import NATIVE_TRAIN, training_settings
from split_unet.launch.inference import infer_in_simulator
from split_unet.launch.simulation import run_simulation
from split_unet.reports import dice_table

NATIVE_GRID = [240, 240, 155]
SEED = 0


def make_data(root: Path, patients: int, phantom_size: int) -> tuple[Path, Path]:
    """(release folder, partitioned sites) of ``patients`` phantoms in the BraTS 2023 layout."""
    release, sites = root / "brats2023", root / "sites"
    if not (sites / "server").is_dir():
        started = time.perf_counter()
        generate_release(release, "brats2023", patients, SEED, size=phantom_size)
        partition_dataset(release, sites, progress=False)
        print(f"{patients} native phantoms in {time.perf_counter() - started:.0f} s")
    return release, sites


def _train(sites: Path, workspace: Path, train: dict) -> dict:
    """A simulator run (read back if it was made before)."""
    if (workspace / "summary.json").is_file():
        return load_json(workspace / "summary.json")
    started = time.perf_counter()
    # The protocol's cost, as docs/performance/native.md published it: undefended (the defence's cost in Dice and
    # bytes is measured apart, docs/privacy.md).
    summary = run_simulation(sites, workspace, training_settings(train, scope=UNDEFENDED_SCOPE), progress=None)
    if "error" in summary:
        raise RuntimeError(f"{workspace}: {summary['error']}")
    print(f"{workspace.name}: {summary['steps']} steps in {time.perf_counter() - started:.0f} s")
    return summary


def step_costs(sites: Path, out: Path, patches: list[int], steps: int, extra: dict) -> list[dict]:
    """Seconds and bytes per training step per site at each patch size (validation with cheap windows)."""
    rows = []
    for patch in patches:
        train = {"size": NATIVE_GRID, "spacing": 1.0, "patch_size": patch, "augment": True, "batch_size": 2,
                 "epochs": 1, "val_fraction": 1 / (2 * steps + 1), "sw_overlap": 0.0, "sw_batch_size": 8,
                 "seed": SEED, **extra}
        summary = _train(sites, out / f"patch{patch}", train)
        per_site = summary["bytes_per_step"]["per_site"]
        rows.append({"patch": patch, "steps": summary["steps"],
                     "seconds_per_step": statistics.median(summary["timing"]["step_seconds"]),
                     "decoder_seconds_per_step": statistics.median(summary["timing"]["decoder_seconds"]),
                     "mb_per_step_per_site": {site: round((b["to_server"] + b["to_site"]) / 1e6, 1)
                                              for site, b in per_site.items()},
                     "server_peak_mb": summary["memory_mb"]["server"],
                     "site_peak_mb": summary["memory_mb"]["sites"], "gpu_peak_mb": summary["memory_mb"].get("gpu"),
                     "dice": summary["dice"]})
    return rows


def budget_comparison(release: Path, sites: Path, out: Path, epochs_coarse: int, epochs_patches: int) -> dict:
    """Whole volumes at 3.75 mm against 1 mm patches of 64^3, scored in source space."""
    common = {"batch_size": 2, "val_fraction": 0.25, "seed": SEED}
    runs = {f"whole volume, 3.75 mm (64^3), {epochs_coarse} epochs": {
                **common, "epochs": epochs_coarse, "val_interval": epochs_coarse, "size": 64, "spacing": 3.75},
            f"patches 64^3, 1 mm, {epochs_patches} epochs": {
                **common, "epochs": epochs_patches, "val_interval": epochs_patches, "size": NATIVE_GRID,
                "spacing": 1.0, "patch_size": 64, "augment": True, "sw_batch_size": 4, "sw_overlap": 0.25}}
    _, val_ids = split_patients([case.patient_id for case in find_cases(release)], 0.25, SEED)
    results = {}
    for name, train in runs.items():
        folder = out / (f"coarse{train['epochs']}" if "whole" in name else f"native{train['epochs']}")
        summary = _train(sites, folder / "train", train)
        started = time.perf_counter()
        scored = infer_in_simulator(folder / "train", sites, folder / "infer", patients=val_ids, progress=None)
        if "error" in scored:
            raise RuntimeError(f"{folder}: {scored['error']}")
        results[name] = {**scored, "wall_seconds": summary["wall_seconds"],
                         "inference_seconds": round(time.perf_counter() - started, 1), "steps": summary["steps"]}
    return results


def markdown(report: dict) -> str:
    lines = ["# Native resolution (native-geometry phantom, 240 x 240 x 155 at 1 mm)", "",
             f"Measured {report['date']} on this machine ({report['note']}).", "",
             f"## Seconds and bytes per training step per site (simulator, float16, batch 2, {report['network']} "
             "network)", "",
             "| patch | steps | s/step (median) | decoder s/step | MB/step/site (both directions) | server peak MB | "
             "GPU peak MB |", "|---|---|---|---|---|---|---|"]
    for row in report["steps"]:
        mb = statistics.mean(row["mb_per_step_per_site"].values())
        gpu = f"{row['gpu_peak_mb']:.0f}" if row.get("gpu_peak_mb") else "-"
        lines.append(f"| {row['patch']}^3 | {row['steps']} | {row['seconds_per_step']:.1f} | "
                     f"{row['decoder_seconds_per_step']:.1f} | {mb:.1f} | {row['server_peak_mb']:.0f} | {gpu} |")
    if report.get("budget"):
        lines += ["", "## Whole volumes at 3.75 mm vs 1 mm patches (source space, validation patients)", "",
                  dice_table(report["budget"]), "",
                  "| run | training steps | training s | inference s |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['steps']} | {r['wall_seconds']:.0f} | {r['inference_seconds']:.0f} |"
                  for name, r in report["budget"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--docs", type=Path, help="also write native.json / native.md here")
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--phantom-size", type=int, default=96, help="phantom edge before it is put on 1 mm")
    parser.add_argument("--patches", default="64,96,128")
    parser.add_argument("--steps", type=int, default=3, help="training steps per patch size")
    parser.add_argument("--epochs", type=int, default=6, help="budget comparison: epochs of each run")
    parser.add_argument("--epochs-coarse", type=int, help="budget comparison: epochs of the whole-volume run")
    parser.add_argument("--epochs-patches", type=int, help="budget comparison: epochs of the patch run")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--network", choices=("default", "native"), default="default",
                        help="steps: the default network, or the native job's (GPU-sized)")
    parser.add_argument("--device", help="cpu, cuda (default: CUDA when available)")
    parser.add_argument("--note", default="2 cores, shared")
    args = parser.parse_args()
    release, sites = make_data(args.out / "data", args.patients, args.phantom_size)
    extra = {"network": NATIVE_TRAIN["network"]} if args.network == "native" else {}
    if args.device:
        extra["device"] = args.device
    report = {"date": time.strftime("%Y-%m-%d"), "note": args.note,
              "network": args.network,
              "steps": step_costs(sites, args.out / f"steps_{args.network}", [int(p) for p in args.patches.split(",")],
                                  args.steps, extra)}
    if not args.skip_budget:
        report["budget"] = budget_comparison(release, sites, args.out / "budget", args.epochs_coarse or args.epochs,
                                             args.epochs_patches or args.epochs)
    for folder in filter(None, (args.out, args.docs)):
        write_json(folder / "native.json", report)
        (folder / "native.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

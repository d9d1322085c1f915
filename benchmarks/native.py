"""Native resolution on the native-geometry phantom (BraTS 2023 layout, 240 x 240 x 155 at 1 mm): learning curves.

Runs (``RUNS``), each for ``--steps`` training steps of batch 2 (the coarse one for ``--coarse-steps``), with the
poly learning-rate schedule, augmentation, and a weight snapshot every ``--interval`` steps:

- whole volumes at 3.75 mm (the 240 mm field of view in 64 voxels), split;
- 64^3 patches at 2 mm, label sampling, split;
- 64^3 patches at 1 mm, uniform and label sampling, split;
- the same network trained centrally on the same 1 mm label-sampled patches and steps;
- the defended job (the shipped scope: no full-resolution level, NoPeek with its warm-up, gradient noise; it
  refuses label sampling) on uniform 1 mm patches.

Split runs go through the NVFlare simulator (float16 on the wire, undefended unless said); their snapshots are the
job's own checkpoints, copied as they appear. Every snapshot is scored the same way, in one process: the composed
network segments the validation patients (Gaussian sliding window of the patch size, ``--eval-overlap``), the
segmentation goes back to each source's geometry and is scored there against the source label (global and
lesion-wise Dice as BraTS 2023 ranks them, false WT lesions). For the last snapshot of each run the smallest
component kept per region (``min_component_voxels``: WT, TC, ET) is chosen on ``POSTPROCESS_PATIENTS`` training
patients and applied to the validation patients. Everything already trained or scored is read back, so the command
resumes; an interrupted split run resumes from its last checkpoint.

    python benchmarks/native.py --out runs/native --phase train --only native1_label,coarse
    python benchmarks/native.py --out runs/native --phase eval      # may run beside training
    python benchmarks/native.py --out runs/native --phase empty     # what the models answer where the input is 0
    python benchmarks/native.py --out runs/native --phase report --docs docs/performance

Writes ``native.json`` and ``native_curves.png`` to ``--out`` and ``--docs``, and the table ``native_curves.md`` to
``--out``; the reading of the figures is docs/performance.md, "Native resolution".
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from split_unet.data import (REGION_NAMES, find_cases, generate_release, label_from_regions, label_to_source,
                             load_case, partition_dataset, regions, split_patients)
from split_unet.data.readers import load_label, read_label
from split_unet.defence import DEFENDED_SCOPE, UNDEFENDED, UNDEFENDED_SCOPE, job_defence
from split_unet.files import load_json, write_json
from split_unet.jobs import NATIVE_TRAIN, train_config, training_settings
from split_unet.leakage.corners import corner_label_leakage
from split_unet.launch.simulation import run_simulation
from split_unet.networks import build_split_unet
from split_unet.training import RegionMetrics, TrainConfig, logits_to_masks, select_device
from split_unet.training.centralized import train_centralized, window_logits
from split_unet.training.postprocess import choose_min_component_voxels
from split_unet.training.schedule import Schedule

SEED = 0
PATIENTS = 24
VAL_PATIENTS = 8
PHANTOM_SIZE = 192  # the template brain (~189 mm) at ~1 mm: label detail at the native resolution
NATIVE_GRID = [240, 240, 155]
POSTPROCESS_PATIENTS = 4
SAMPLINGS = ("label", "uniform")
SITES = ["flair", "t1w", "t1gd", "t2w"]


@dataclass(frozen=True)
class Run:
    key: str
    name: str
    mode: str  # "split" or "centralized"
    spacing: float
    size: int | list[int]
    patch: int | None
    sampling: str | None
    scope: str = UNDEFENDED_SCOPE


RUNS = [
    Run("coarse", "whole volumes, 3.75 mm", "split", 3.75, 64, None, None),
    Run("native1_label", "1 mm patches, label sampling", "split", 1.0, NATIVE_GRID, 64, "label"),
    Run("central1_label", "1 mm patches, label sampling, centralized", "centralized", 1.0, NATIVE_GRID, 64, "label"),
    Run("native1_uniform", "1 mm patches, uniform", "split", 1.0, NATIVE_GRID, 64, "uniform"),
    Run("native2_label", "2 mm patches, label sampling", "split", 2.0, [120, 120, 78], 64, "label"),
    # The shipped defended scope refuses label sampling (``defence.DEFENCE.label_sampling``): uniform patches.
    Run("defended1_uniform", "1 mm patches, uniform, defended", "split", 1.0, NATIVE_GRID, 64, "uniform",
        DEFENDED_SCOPE),
]


def make_data(root: Path) -> tuple[Path, Path]:
    """(release folder, partitioned sites) of ``PATIENTS`` phantoms in the BraTS 2023 layout."""
    release, sites = root / "brats2023", root / "sites"
    if not (sites / "server").is_dir():
        started = time.perf_counter()
        generate_release(release, "brats2023", PATIENTS, SEED, size=PHANTOM_SIZE)
        partition_dataset(release, sites, progress=False)
        print(f"{PATIENTS} native phantoms in {time.perf_counter() - started:.0f} s")
    return release, sites


def run_steps(run: Run, args: argparse.Namespace) -> int:
    """``--run-steps`` for this run, else ``--coarse-steps`` (whole volumes) or ``--steps``."""
    given = dict(item.split("=") for item in args.run_steps.split(",") if item)
    return int(given[run.key]) if run.key in given else args.coarse_steps if run.patch is None else args.steps


def train_settings(run: Run, args: argparse.Namespace) -> dict:
    """The run's ``train`` settings: epochs of ``--interval`` steps, validation in the job only after the last
    (cheap windows: the curves are scored apart)."""
    epochs = run_steps(run, args) // args.interval
    train = {"batch_size": 2, "seed": SEED, "val_fraction": VAL_PATIENTS / PATIENTS, "augment": True,
             "lr_schedule": "poly", "steps_per_epoch": args.interval, "epochs": epochs, "val_interval": epochs,
             "size": run.size, "spacing": run.spacing, "sw_overlap": 0.0, "sw_batch_size": 8,
             # Every party holds the training patients at most (the validation ones load at the end): 16 x 36 MB
             # per site at 1 mm, as much again for the centralized run's images and labels per patient.
             "cache_cases": PATIENTS - VAL_PATIENTS}
    if run.patch is not None:
        train.update(patch_size=args.patch or run.patch, patch_sampling=run.sampling)
    if args.network == "native":
        train["network"] = NATIVE_TRAIN["network"]
    if args.device:
        train["device"] = args.device
    return train


def run_config(run: Run, args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the run trains with (the defended one with its defence's settings and levels)."""
    defence = job_defence(run.scope) if run.mode == "split" else UNDEFENDED
    return train_config(train_settings(run, args), defence=defence)


class SnapshotCopier:
    """Copies each checkpoint a split run writes (server decoder, every site's encoder) to ``snapshots/step_N``,
    with the seconds since the run started: the job keeps only its latest checkpoints."""

    def __init__(self, persistent: Path, snapshots: Path):
        self.persistent, self.snapshots = persistent, snapshots
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._seen = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "SnapshotCopier":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.copy()

    def _loop(self) -> None:
        while not self._stop.wait(5.0):
            self.copy()

    def copy(self) -> None:
        server = self.persistent / "server" / "checkpoints" / "server.pt"
        if not server.is_file() or server.stat().st_mtime == self._seen:
            return
        self._seen = server.stat().st_mtime
        state = torch.load(server, map_location="cpu", weights_only=True)
        step = int(state["train_step"])
        target = self.snapshots / f"step_{step:07d}"
        if (target / "server.pt").is_file():
            return
        target.mkdir(parents=True, exist_ok=True)
        for site in SITES:
            shutil.copy(self.persistent / site / "checkpoints" / f"step_{step:07d}.pt", target / f"{site}.pt")
        torch.save({"decoder": state["decoder"]}, target / "server.pt")
        write_json(target / "seen.json", {"seconds_since_start": round(time.perf_counter() - self.started, 1)})


def collect_centralized_snapshots(folder: Path) -> None:
    """Move the centralized run's weight snapshots (``model_step_N.pt``, written a while ago: complete) into
    ``snapshots/step_N/model.pt``, the layout of the split runs' snapshots; also while the run still trains."""
    for path in sorted((folder / "train").glob("model_step_*.pt")):
        if time.time() - path.stat().st_mtime < 30:
            continue
        target = folder / "snapshots" / f"step_{int(path.stem.rsplit('_', 1)[1]):07d}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target / "model.pt")


def train_run(run: Run, release: Path, sites: Path, folder: Path, args: argparse.Namespace) -> dict:
    """Train (or read back) one run; its snapshots lie in ``folder/snapshots``."""
    summary_path = folder / "train" / "summary.json"
    if summary_path.is_file():
        return load_json(summary_path)
    train, steps = train_settings(run, args), run_steps(run, args)
    started = time.perf_counter()
    if run.mode == "centralized":
        summary = train_centralized(release, folder / "train", "late", config=run_config(run, args),
                                    snapshot_steps=list(range(args.interval, steps + 1, args.interval)),
                                    log=lambda line: print(line, flush=True))
        collect_centralized_snapshots(folder)
    else:
        checkpoints = {"executor_args": {"checkpoint_dir": "persistent/checkpoints"},
                       "controller_args": {"checkpoint_dir": "persistent/checkpoints",
                                           "checkpoint_interval": args.interval, "resume": True}}
        job = training_settings(train, scope=run.scope, **checkpoints)
        with SnapshotCopier(folder / "state", folder / "snapshots"):
            summary = run_simulation(sites, folder / "train", job, persistent=folder / "state", progress=None)
        if "error" in summary:
            raise RuntimeError(f"{run.key}: {summary['error']}")
    print(f"{run.key}: {summary['steps']} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def snapshot_model(run: Run, config: TrainConfig, snapshot: Path) -> torch.nn.Module:
    """The composed network of a snapshot: centralized weights, or the sites' encoders and the server's decoder."""
    model = build_split_unet(config.network, (1,) * len(SITES), SEED).to(select_device(config.device))
    if run.mode == "centralized":
        model.load_state_dict(torch.load(snapshot / "model.pt", map_location="cpu", weights_only=True))
        model.to(select_device(config.device))
    else:
        for encoder, site in zip(model.encoders, SITES):
            encoder.load_state_dict(torch.load(snapshot / f"{site}.pt", map_location="cpu",
                                               weights_only=True)["encoder"])
        model.decoder.load_state_dict(torch.load(snapshot / "server.pt", map_location="cpu",
                                                 weights_only=True)["decoder"])
    return model.eval()


class Patients:
    """Patients on one grid (images and region masks) with their source geometry and source labels, loaded once."""

    def __init__(self, release: Path, patient_ids: list[str], size, spacing: float):
        cases = {case.patient_id: case for case in find_cases(release)}
        self.items = []
        for pid in patient_ids:
            case = cases[pid]
            grid = load_case(case, size, spacing)
            truth, image = read_label(case.label, case.convention, patient=pid)
            self.items.append({"id": pid, "image": grid["image"], "grid_label": grid["label"].astype(np.uint8),
                               "convention": case.convention, "affine": image.affine, "shape": truth.shape,
                               "truth": regions(truth, case.convention),
                               "voxel": tuple(float(v) for v in nib.affines.voxel_sizes(image.affine))})


@torch.no_grad()
def grid_logits(model: torch.nn.Module, config: TrainConfig, image: np.ndarray, overlap: float) -> torch.Tensor:
    """(1, 3, *grid) logits of one patient: whole volume, or the Gaussian sliding window of the patch size."""
    device = next(model.parameters()).device
    if config.patch_shape is None:
        return model(torch.from_numpy(image[None]).to(device)).float().cpu()
    windows = TrainConfig.from_dict({**config.to_dict(), "sw_overlap": overlap, "sw_batch_size": 4})
    return window_logits(model, image[None], windows, device).cpu()


def patient_logits(model: torch.nn.Module, config: TrainConfig, patients: Patients,
                   overlap: float) -> tuple[list[torch.Tensor], float]:
    """Every patient's grid logits and the mean seconds per case (network and blending)."""
    logits, seconds = [], []
    for item in patients.items:
        started = time.perf_counter()
        logits.append(grid_logits(model, config, item["image"], overlap))
        seconds.append(time.perf_counter() - started)
    return logits, round(float(np.mean(seconds)), 1)


def score_in_source(logits: list[torch.Tensor], config: TrainConfig, patients: Patients,
                    min_component_voxels: int | list[int] = 0) -> dict:
    """Source-space scores of the segmentations the logits give, each back in its source's geometry."""
    metrics = RegionMetrics(with_hd95=False)  # Dice only: HD95's surface distances cost most
    for item, patient in zip(patients.items, logits):
        mask = logits_to_masks(patient, min_component_voxels=min_component_voxels)[0].numpy()
        label = label_to_source(label_from_regions(mask, item["convention"]), item["affine"], item["shape"],
                                config.spacing)
        metrics.update(torch.from_numpy(regions(label, item["convention"]))[None],
                       torch.from_numpy(item["truth"])[None], [item["voxel"]])
    aggregate = metrics.aggregate()
    return {"source_dice": aggregate["dice"], "lesion_dice": aggregate["lesion_dice"],
            "false_lesions": aggregate["lesions"]["WT"]["fp"]}


def choose_postprocessing(model: torch.nn.Module, config: TrainConfig, patients: Patients, overlap: float) -> dict:
    """The smallest component kept per region (WT, TC, ET), chosen on training patients (grid scores)."""
    logits, _ = patient_logits(model, config, patients, overlap)
    targets = [torch.from_numpy(item["grid_label"]).float()[None] for item in patients.items]
    sizes, scores = choose_min_component_voxels(logits, targets, [(config.spacing,) * 3] * len(logits))
    return {"min_component_voxels": list(sizes),
            "scores": {region: {str(k): round(v, 4) for k, v in by_size.items()} for region, by_size in scores.items()}}


def evaluate_runs(release: Path, out: Path, runs: list[Run], args: argparse.Namespace) -> None:
    """Score every snapshot not scored yet; for a finished run's last snapshot also the post-processed scores."""
    ids = [case.patient_id for case in find_cases(release)]
    train_ids, val_ids = split_patients(ids, VAL_PATIENTS / PATIENTS, SEED)
    loaded: dict[tuple, tuple[Patients, Patients]] = {}
    for run in runs:
        folder, config = out / run.key, run_config(run, args)
        if run.mode == "centralized":
            collect_centralized_snapshots(folder)
        snapshots = sorted((folder / "snapshots").glob("step_*"))
        finished = (folder / "train" / "summary.json").is_file()
        for snapshot in snapshots:
            if int(snapshot.name.split("_")[1]) % args.curve_every and not (finished and snapshot == snapshots[-1]):
                continue
            result_path = snapshot / f"scores_overlap{args.eval_overlap}.json"
            final = finished and snapshot == snapshots[-1]
            done = load_json(result_path) if result_path.is_file() else None
            if done is not None and (not final or "postprocessed" in done):
                continue
            if not (snapshot / ("model.pt" if run.mode == "centralized" else "server.pt")).is_file():
                continue
            key = (str(run.size), run.spacing)
            if key not in loaded:
                loaded[key] = (Patients(release, val_ids, run.size, run.spacing),
                               Patients(release, train_ids[:POSTPROCESS_PATIENTS], run.size, run.spacing))
            val, train = loaded[key]
            model = snapshot_model(run, config, snapshot)
            started = time.perf_counter()
            # The logits once for both scores: a 1 mm case costs minutes on a CPU.
            logits, seconds = patient_logits(model, config, val, args.eval_overlap)
            result = done or {**score_in_source(logits, config, val), "inference_seconds_per_case": seconds}
            if final:
                chosen = choose_postprocessing(model, config, train, args.eval_overlap)
                result["postprocessed"] = {**chosen, **score_in_source(logits, config, val,
                                                                       chosen["min_component_voxels"]),
                                           "inference_seconds_per_case": result["inference_seconds_per_case"]}
            write_json(result_path, result)
            print(f"{run.key} {snapshot.name}: mean Dice {result['source_dice']['mean']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


def corner_leakage(release: Path, out: Path, args: argparse.Namespace) -> dict:
    """What the patch corners of the 1 mm runs tell a site: per training patient, the best whole-tumour map from
    every corner it received over the run (``leakage.corners``), label sampling against uniform."""
    path = out / "corner_leakage.json"
    if path.is_file():
        return load_json(path)
    ids = [case.patient_id for case in find_cases(release)]
    train_ids, _ = split_patients(ids, VAL_PATIENTS / PATIENTS, SEED)
    labelled = next(run for run in RUNS if run.key == "native1_label")
    config = run_config(labelled, args)
    cases = {case.patient_id: case for case in find_cases(release)}
    tumour = {pid: load_label(cases[pid].label, config.size, cases[pid].convention, config.spacing, patient=pid,
                              dtype=np.uint8)[0].astype(bool) for pid in train_ids}  # the whole tumour on the grid
    result = {"steps": run_steps(labelled, args), "patch": labelled.patch,
              "positive_fraction": config.patch_positive_fraction}
    for sampling in SAMPLINGS:
        sampled = TrainConfig.from_dict({**config.to_dict(), "patch_sampling": sampling})
        schedule = Schedule(train_ids, sampled, len(SITES))
        received: dict[str, list] = {pid: [] for pid in train_ids}
        for epoch in range(sampled.epochs):
            for step in schedule.steps(epoch):
                patches = schedule.patches(step, [tumour[pid] for pid in step.patient_ids])
                for pid, corner in zip(step.patient_ids, patches.starts):
                    received[pid].append(corner)
        per_patient = {pid: corner_label_leakage(received[pid], config.patch_shape, tumour[pid]) for pid in train_ids}
        scores = list(per_patient.values())
        result[sampling] = {"mean_dice_wt": round(float(np.mean([r["dice"] for r in scores])), 3),
                            "corners_per_patient": round(float(np.mean([r["corners"] for r in scores])), 1),
                            "patients": per_patient}
        print(f"corner leakage, {sampling} sampling: mean Dice WT {result[sampling]['mean_dice_wt']:.3f}", flush=True)
    write_json(path, result)
    return result


def empty_input(release: Path, out: Path, runs: list[Run], args: argparse.Namespace) -> dict:
    """What the last snapshot of each finished patch run answers, left to itself, on a window whose every modality
    is 0 (outside a skull-stripped head): per region the mean and spread of its logits. Why the sliding window
    answers such windows as background (``training.sliding_window.logits_of_windows``) instead of asking it."""
    path = out / "empty_input.json"
    result = load_json(path) if path.is_file() else {}
    for run in runs:
        folder, config = out / run.key, run_config(run, args)
        snapshots = sorted((folder / "snapshots").glob("step_*"))
        if run.key in result or run.patch is None or not (folder / "train" / "summary.json").is_file():
            continue
        model = snapshot_model(run, config, snapshots[-1])
        device = next(model.parameters()).device
        with torch.no_grad():
            zero = model(torch.zeros(1, len(SITES), *config.patch_shape, device=device)).float().cpu()[0]
        result[run.key] = {"step": int(snapshots[-1].name.split("_")[1]),
                           "zero_window_logits": {region: {"mean": round(float(zero[k].mean()), 3),
                                                           "std": round(float(zero[k].std()), 3)}
                                                  for k, region in enumerate(REGION_NAMES)}}
        write_json(path, result)
        print(f"{run.key}: zero window WT logit {result[run.key]['zero_window_logits']['WT']}", flush=True)
    return result


def train_seconds(folder: Path, steps: list[int]) -> dict[int, float | None]:
    """Seconds of training (wall) up to each snapshot step. Split runs: when the snapshot was copied, from the job's
    start (its start-up included); a resumed run continues from its last snapshot before the resume. Centralized:
    the run's own step times (once it has finished)."""
    summary_path = folder / "train" / "summary.json"
    seconds: dict[int, float | None] = {}
    offset = previous = 0.0
    for step in steps:
        seen = folder / "snapshots" / f"step_{step:07d}" / "seen.json"
        if seen.is_file():
            raw = load_json(seen)["seconds_since_start"]
            if raw < previous:  # a resumed run's clock starts again
                offset = seconds[max(seconds)] or 0.0
            previous = raw
            seconds[step] = round(offset + raw, 1)
        elif summary_path.is_file() and "timing" in (summary := load_json(summary_path)):
            seconds[step] = round(float(sum(summary["timing"]["step_seconds"][:step])), 1)
        else:
            seconds[step] = None
    return seconds


def report(out: Path, runs: list[Run], args: argparse.Namespace) -> dict:
    rows = []
    for run in runs:
        folder = out / run.key
        snapshots = sorted((folder / "snapshots").glob("step_*"))
        seconds = train_seconds(folder, [int(snapshot.name.split("_")[1]) for snapshot in snapshots])
        curve = []
        for snapshot in snapshots:
            result_path = snapshot / f"scores_overlap{args.eval_overlap}.json"
            if result_path.is_file():
                step = int(snapshot.name.split("_")[1])
                curve.append({"step": step, "train_seconds": seconds[step], **load_json(result_path)})
        summary_path = folder / "train" / "summary.json"
        finished = summary_path.is_file() and "dice" in (summary := load_json(summary_path))
        if finished and run.spacing == 1.0 and (not curve or curve[-1]["step"] < summary["steps"]):
            # Not scored here (yet): the job's own validation of its last step. At 1 mm on the native geometry the
            # grid is the source's voxels (axes flipped), so its Dice is the source-space Dice (without overlap
            # or post-processing: the job validates with sw_overlap 0).
            curve.append({"step": summary["steps"], "train_seconds": seconds.get(summary["steps"]),
                          "source_dice": summary["dice"], "lesion_dice": summary["lesion_dice"],
                          "false_lesions": summary["lesions"]["WT"]["fp"], "inference_seconds_per_case": None,
                          "scored_by": "the job's validation, sw_overlap 0"})
        if not curve:
            continue
        last = curve[-1]
        best = last.get("postprocessed", last)
        rows.append({"name": run.name, "key": run.key, "mode": run.mode, "spacing_mm": run.spacing,
                     "patch": run.patch and (args.patch or run.patch), "sampling": run.sampling, "scope": run.scope,
                     "steps": last["step"], "planned_steps": run_steps(run, args),
                     "train_seconds": last["train_seconds"], "source_dice": best["source_dice"],
                     "lesion_dice": best["lesion_dice"], "false_lesions": best["false_lesions"],
                     "inference_seconds_per_case": best["inference_seconds_per_case"],
                     "min_component_voxels": last.get("postprocessed", {}).get("min_component_voxels"),
                     "without_postprocessing": {k: last[k] for k in ("source_dice", "lesion_dice", "false_lesions")},
                     "scored_by": last.get("scored_by", f"in process, sw_overlap {args.eval_overlap}"),
                     "curve": [{k: point[k] for k in ("step", "train_seconds", "source_dice", "lesion_dice",
                                                      "false_lesions")} for point in curve]})
    return {"date": time.strftime("%Y-%m-%d"), "note": args.note, "patients": PATIENTS,
            "validation_patients": VAL_PATIENTS, "phantom_size": PHANTOM_SIZE, "batch_size": 2,
            "eval_overlap": args.eval_overlap, "interval": args.interval, "network": args.network, "runs": rows}


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in document["runs"]:
        steps = [p["step"] for p in row["curve"]]
        dice = [p["source_dice"]["mean"] for p in row["curve"]]
        seconds = [(p["train_seconds"] or np.nan) / 60 for p in row["curve"]]
        axes[0].plot(steps, dice, marker="o", label=row["name"])
        axes[1].plot(seconds, dice, marker="o", label=row["name"])
    axes[0].set_xlabel("training step (batch 2)")
    axes[1].set_xlabel("training minutes (this machine)")
    axes[0].set_ylabel("source-space mean Dice, validation patients")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(document: dict) -> str:
    lines = ["# Native resolution: learning curves (native-geometry phantom, 240 x 240 x 155 at 1 mm)", "",
             f"Measured {document['date']} on this machine ({document['note']}). {document['patients']} phantoms, "
             f"{document['validation_patients']} of them validation; batch 2; scores in source space, sliding-window "
             f"overlap {document['eval_overlap']}.", "",
             "| run | mode | mm | patch | sampling | steps | train min | Dice WT | TC | ET | mean | lesion Dice WT | "
             "TC | ET | mean | false WT lesions | min component | s/case |", "|" + "---|" * 18]
    for r in document["runs"]:
        d, ld = r["source_dice"], r["lesion_dice"]
        minutes = f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "-"
        lines.append(f"| {r['name']} | {r['mode']} | {r['spacing_mm']} | {r['patch'] or 'whole'} | "
                     f"{r['sampling'] or '-'} | {r['steps']} | {minutes} | {d['WT']:.3f} | {d['TC']:.3f} | "
                     f"{d['ET']:.3f} | {d['mean']:.3f} | {ld['WT']:.3f} | {ld['TC']:.3f} | {ld['ET']:.3f} | "
                     f"{ld['mean']:.3f} | {r['false_lesions']} | {r['min_component_voxels']} | "
                     f"{r['inference_seconds_per_case']} |")
    lines += ["", "Curves (mean source-space Dice at each snapshot, before post-processing):", ""]
    for r in document["runs"]:
        points = ", ".join(f"{p['step']}: {p['source_dice']['mean']:.3f}" for p in r["curve"])
        lines.append(f"- {r['name']}: {points}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--docs", type=Path, help="also write native.json and native_curves.png here")
    parser.add_argument("--phase", choices=("train", "eval", "leakage", "empty", "report", "all"), default="all")
    parser.add_argument("--only", help="comma-separated run keys (default: all)")
    parser.add_argument("--steps", type=int, default=240, help="training steps of each patch run")
    parser.add_argument("--coarse-steps", type=int, default=240, help="training steps of the whole-volume run")
    parser.add_argument("--interval", type=int, default=40, help="steps between snapshots (the curves' points)")
    parser.add_argument("--run-steps", default="", help="per-run steps, e.g. native1_uniform=120,coarse=400")
    parser.add_argument("--curve-every", type=int, default=80,
                        help="score the snapshots of these multiples of steps (and the last): the curves' points")
    parser.add_argument("--eval-overlap", type=float, default=0.25, help="sliding-window overlap when scoring")
    parser.add_argument("--patch", type=int, help="patch side of the patch runs (default 64)")
    parser.add_argument("--network", choices=("default", "native"), default="default",
                        help="the default network, or the native job's (GPU-sized)")
    parser.add_argument("--device", help="cpu, cuda (default: CUDA when available)")
    parser.add_argument("--note", default="2 cores, shared")
    args = parser.parse_args()
    runs = [run for run in RUNS if not args.only or run.key in args.only.split(",")]
    release, sites = make_data(args.out / "data")
    if args.phase in ("train", "all"):
        for run in runs:
            train_run(run, release, sites, args.out / run.key, args)
    if args.phase in ("eval", "all"):
        evaluate_runs(release, args.out, runs, args)
    if args.phase in ("leakage", "all"):
        corner_leakage(release, args.out, args)
    if args.phase in ("empty", "all"):
        empty_input(release, args.out, runs, args)
    if args.phase in ("report", "all"):
        document = report(args.out, runs, args)
        if (args.out / "corner_leakage.json").is_file():
            leakage = load_json(args.out / "corner_leakage.json")
            document["corner_leakage"] = {key: value for key, value in leakage.items() if key not in SAMPLINGS}
            document["corner_leakage"].update({s: {k: v for k, v in leakage[s].items() if k != "patients"}
                                               for s in SAMPLINGS})
        if (args.out / "empty_input.json").is_file():
            document["empty_input"] = load_json(args.out / "empty_input.json")
        # The docs cite the JSON and the plot; the table is this run's own summary.
        (args.out / "native_curves.md").write_text(markdown(document))
        for folder in filter(None, (args.out, args.docs)):
            write_json(folder / "native.json", document)
            plot(document, folder / "native_curves.png")
        print(markdown(document))


if __name__ == "__main__":
    main()

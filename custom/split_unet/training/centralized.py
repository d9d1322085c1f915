"""Centralized training: the same networks, batches and budget as split learning, in one process.

Late fusion trains the very ``SplitUNet`` whose parts the federation holds apart; early fusion and a
single modality are the usual baselines.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from split_unet.data import MODALITIES, find_cases, grid_spacing, load_case, split_patients
from split_unet.networks import build_split_unet
from split_unet.profiling import CpuPerStep, cpu_seconds, peak_memory_mb
from split_unet.files import write_json
from split_unet.reports import make_summary

from .augment import augment_image, intensity_seed, spatial_augment
from .config import TrainConfig
from .metrics import RegionMetrics, logits_to_masks
from .objective import autocast, chunks, grad_scaler, segmentation_loss, select_device
from .parties import make_optimizer, present_inputs, set_learning_rate
from .patches import cut_patch, sample_patch_starts, step_seeds
from .schedule import Schedule, learning_rate
from .sliding_window import empty_window_flags, logits_of_windows, sliding_window_logits

MODES = ("late", "early", "single")


def mode_inputs(mode: str, modality: str | None, encoders: int = len(MODALITIES)) -> tuple[tuple[int, ...], list[int]]:
    """(encoder input channels, image channels used) for a centralized mode.

    Late fusion with more ``encoders`` than modalities repeats the modalities in order, as the extra sites of a
    benchmark do (``split_unet.launch.benchmark``); fewer takes the first ones.
    """
    if mode == "late":
        return (1,) * encoders, [k % len(MODALITIES) for k in range(encoders)]
    if mode == "early":
        return (len(MODALITIES),), list(range(len(MODALITIES)))
    if mode == "single":
        if modality not in MODALITIES:
            raise ValueError(f"--modality must be one of {MODALITIES} for mode 'single', got {modality!r}")
        return (1,), [MODALITIES.index(modality)]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class CentralizedTrainer:
    """The whole network in one process: one forward pass, one loss, one backward pass and one optimiser step over
    every part, the arithmetic the split job spreads over its parties (``EncoderParty``, ``DecoderParty``)."""

    def __init__(self, model: torch.nn.Module, lr: float, device: torch.device, amp: bool = False):
        self.model = model.to(device)
        self.optimizer = make_optimizer(self.model.parameters(), lr)
        self.scaler = grad_scaler(device, amp)
        self.loss_function = segmentation_loss()
        self.device, self.amp = device, amp

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, present: Sequence[bool] | None = None) -> float:
        """images (B, C, *S), labels (B, 3, *S) region masks; present: see ``FusionDecoder``. Returns the loss."""
        self.model.train()
        with autocast(self.device, self.amp):
            logits = self.model(images.to(self.device), present)
        loss = self.loss_function(logits.float(), labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


class CaseCache:
    """Preprocessed cases, ``get(patient_id)`` -> {"image": (4, *S), "label": (3, *S)}; the ``cache_cases`` most
    recently used are kept (0: all), as the federated parties keep theirs (``TrainConfig.cache_cases``)."""

    def __init__(self, data_dir: str | Path, size: int, spacing: float | None, cache_cases: int = 0):
        self.cases = {case.patient_id: case for case in find_cases(data_dir)}
        self.size, self.spacing = size, spacing
        self.get = functools.lru_cache(maxsize=cache_cases or None)(self._load)

    def _load(self, patient_id: str) -> dict:
        case = load_case(self.cases[patient_id], self.size, self.spacing)
        # Region masks kept as uint8, as the label holder keeps them: a quarter of float32 (107 -> 27 MB at 1 mm).
        return {**case, "label": case["label"].astype(np.uint8)} if "label" in case else case

    def grid_spacing(self, patient_id: str) -> tuple[float, float, float]:
        """Voxel size (mm) of one case on the common grid, from its label's header."""
        return grid_spacing(nib.load(self.cases[patient_id].label).affine, self.spacing)

    def batch(self, patient_ids: list[str], image_channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.get(pid) for pid in patient_ids]
        images = np.stack([item["image"][image_channels] for item in items])
        labels = np.stack([item["label"] for item in items]).astype(np.float32)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def patch_batch(self, patient_ids: list[str], image_channels: list[int], config: TrainConfig,
                    train_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training patches of step ``train_step``: the corners the split job's server draws, cut and
        (``config.augment``) augmented as its sites and server do. Input channel j gets the intensity
        augmentation of site j (late fusion: encoder j; early fusion: the site of modality j)."""
        items = [self.get(pid) for pid in patient_ids]
        patch = config.patch_shape
        tumour = [item["label"][0] for item in items] if config.patch_sampling == "label" else None  # WT masks
        corners = sample_patch_starts(config.grid_shape, patch, config.seed, train_step, len(items), labels=tumour,
                                      positive_fraction=config.patch_positive_fraction)
        spatial = step_seeds(config.seed, train_step, len(items))
        images, labels = [], []
        for k, (item, corner) in enumerate(zip(items, corners)):
            image = cut_patch(item["image"], corner, patch)[image_channels]
            label = cut_patch(item["label"], corner, patch).astype(np.float32)
            if config.augment:
                image = augment_image(image, spatial[k], [intensity_seed(config.seed, j, train_step, k)
                                                          for j in range(len(image))])
                label = spatial_augment(label, spatial[k], "nearest")
            images.append(image)
            labels.append(label)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def train_centralized(data_dir: str | Path, out_dir: str | Path, mode: str = "late", modality: str | None = None,
                      config: TrainConfig | None = None, log: Callable[[str], None] = print,
                      encoders: int = len(MODALITIES), snapshot_steps: Sequence[int] = ()) -> dict:
    """Train one centralized baseline, write ``out_dir/summary.json`` and TensorBoard events; return the summary.

    ``encoders``: late fusion only, see ``mode_inputs``. ``snapshot_steps``: after each of these training steps the
    model's weights go to ``out_dir/model_step_<step>.pt`` (learning curves).
    """
    config = config or TrainConfig()
    in_channels, image_channels = mode_inputs(mode, modality, encoders)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(config.device)
    torch.manual_seed(config.seed)

    data = CaseCache(data_dir, config.size, config.spacing, config.cache_cases)
    train_ids, val_ids = split_patients(sorted(data.cases), config.val_fraction, config.seed)
    trainer = CentralizedTrainer(build_split_unet(config.network, in_channels, config.seed), config.lr, device,
                                 config.amp)
    model = trainer.model
    writer = SummaryWriter(log_dir=str(out_dir / "tb_events"))
    name = mode if mode != "single" else f"single:{modality}"
    patches = "whole volumes" if config.patch_shape is None else "patches " + "x".join(map(str, config.patch_shape))
    log(f"[centralized {name}] {len(train_ids)} training / {len(val_ids)} validation patients on {device}, "
        f"{patches}")
    for patient_id in train_ids + val_ids:  # load (and check) every case before training, as the sites do
        data.get(patient_id)

    start, step, history, metrics, step_seconds, step_cpu = time.perf_counter(), 0, [], None, [], CpuPerStep()
    schedule = Schedule(train_ids, config, len(in_channels))
    for epoch in range(config.epochs):
        losses = []
        for scheduled in schedule.steps(epoch):
            step_started = time.perf_counter()
            step = scheduled.train_step
            if config.patch_shape is None:
                images, labels = data.batch(scheduled.patient_ids, image_channels)
            else:
                images, labels = data.patch_batch(scheduled.patient_ids, image_channels, config, step)
            trainer.set_learning_rate(learning_rate(config, step))
            # The same draw as the split job's; the left-out encoder gets no gradient, so Adam skips it.
            losses.append(trainer.train_step(images, labels, present_inputs(scheduled.absent, len(in_channels))))
            step_seconds.append(time.perf_counter() - step_started)
            step_cpu.mark(cpu_seconds())
            writer.add_scalar("train/loss", losses[-1], step)
            if step in snapshot_steps:
                torch.save(model.state_dict(), out_dir / f"model_step_{step:07d}.pt")
        entry = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
                 "seconds": time.perf_counter() - start}
        log(f"[centralized {name}] epoch {epoch + 1}/{config.epochs} loss {entry['loss']:.4f} "
            f"({step} steps, {entry['seconds']:.0f} s)")
        if schedule.validates_after(epoch):
            metrics = evaluate(model, data, val_ids, image_channels, config, device)
            entry["validation"] = metrics
            for region, value in metrics["dice"].items():
                writer.add_scalar(f"val/dice_{region}", value, step)
            log(f"[centralized {name}] validation Dice " +
                " ".join(f"{k} {v:.3f}" for k, v in metrics["dice"].items()))
        history.append(entry)
    writer.close()
    torch.save(model.state_dict(), out_dir / "model.pt")
    summary = make_summary(metrics, epochs=config.epochs, steps=step, wall_seconds=time.perf_counter() - start,
                           config={**config.to_dict(), "mode": mode, "modality": modality,
                                   "data": str(data_dir), "train_patients": len(train_ids),
                                   "val_patients": len(val_ids), "encoders": len(in_channels)},
                           history=history, timing={"step_seconds": [round(s, 4) for s in step_seconds],
                                                    "cpu_seconds_per_step": {"process": step_cpu.per_step,
                                                                             "total": step_cpu.per_step}},
                           memory_mb={"process": peak_memory_mb()}, cpu_seconds={"process": cpu_seconds()})
    write_json(out_dir / "summary.json", summary)
    return summary


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: CaseCache, patient_ids: list[str], image_channels: list[int],
             config: TrainConfig, device: torch.device) -> dict:
    """Validation metrics: whole volumes, or (patch training) MONAI's Gaussian sliding window of patches."""
    model.eval()
    metrics = RegionMetrics()
    for batch_ids in chunks(patient_ids, config.val_batch_size):
        images, labels = data.batch(batch_ids, image_channels)
        if config.patch_shape is None:
            with autocast(device, config.amp):
                logits = model(images.to(device))
        else:
            logits = window_logits(model, images.numpy(), config, device)
        metrics.update(logits_to_masks(logits.float(), min_component_voxels=config.min_component_voxels), labels,
                       [data.grid_spacing(pid) for pid in batch_ids])
    return metrics.aggregate()


def window_logits(model: torch.nn.Module, images: np.ndarray, config: TrainConfig,
                  device: torch.device) -> torch.Tensor:
    """(B, C, *grid) images -> (B, out, *grid) logits of windows of the patch size, as the split job's server
    blends the windows its sites encode (a window 0 in every channel is background, as there)."""
    def predict(corners, rows=None):
        rows = rows or [0] * len(corners)
        windows = np.stack([cut_patch(images[row], corner, config.patch_shape) for corner, row in zip(corners, rows)])

        def answer(keep: list[int]) -> torch.Tensor:
            with autocast(device, config.amp):
                return model(torch.from_numpy(windows[keep]).to(device))

        return logits_of_windows(empty_window_flags(windows), answer, config.network.out_channels, config.patch_shape)

    return sliding_window_logits(images.shape[2:], config.patch_shape, predict, config.sw_batch_size,
                                 config.sw_overlap, batch=len(images), device=device)

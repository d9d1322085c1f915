"""The server's training workflow: the label holder that runs the decoder and drives every step.

Each step is one round trip (``SiteRounds``): every site gets its own task (the gradient of its previous
activations and the next batch: patient ids and, with patch training, each patient's patch corner and augmentation
seed) at the same time, answers with its new activations, and the decoder steps. The schedule is
``training.Schedule``'s, the learning ``DecoderParty``'s, the checkpoint ``ServerCheckpoint``'s and the tracking
``Telemetry``'s; this class puts them in order.
"""

from __future__ import annotations

import gc
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from split_unet.data import MODALITIES, split_patients
from split_unet.files import write_json
from split_unet.profiling import CpuPerStep, cpu_seconds, peak_memory_mb, process_cpu_seconds, resident_memory_mb
from split_unet.reports import make_summary
from split_unet.training import RegionMetrics, chunks, gpu_peak_mb, logits_to_masks
from split_unet.training.schedule import Schedule, Step, learning_rate

from .checkpoint import SERVER_CHECKPOINT, ServerCheckpoint
from .settings import job_scope
from .paths import inside
from .wire import TASK_FINISH, TASK_TRAIN, TASK_VALIDATE
from .rounds import INIT_TIMEOUT
from .workflow import SplitWorkflow


class SplitUNetController(SplitWorkflow):
    """Split-learning training of the Split-U-Net (arguments of ``SplitWorkflow``, plus):

    Args:
        persistor_id: component id of the NVFlare ``ModelPersistor`` that loads/saves the decoder.
        on_site_failure: for a lost site (no answer within ``task_timeout``, or NVFlare reports it dead): "stop"
            ends the job (the last complete checkpoint stays for a resume); "continue" trains and validates on
            without that modality, as modality dropout does (train with ``modality_dropout`` so the model copes). A
            site that answers with an error always stops the job.
        checkpoint_dir: folder (relative to the server's workspace; absolute paths and '..' are refused) of the
            server's checkpoint; the sites keep theirs in their own ``ModalitySiteExecutor(checkpoint_dir=...)``.
        checkpoint_interval: training steps between checkpoints (0: none).
        resume: start from the checkpoint in ``checkpoint_dir`` (if there is one): the same run continues, and
            ``train.epochs`` may be raised to train on.
        transport: see ``SplitWorkflow``.
    """

    def __init__(self, sites: Sequence[str] = MODALITIES, train: dict | None = None, wire_dtype: str = "float32",
                 persistor_id: str = "persistor", task_timeout: int = 600, summary_file: str = "summary.json",
                 num_threads: int = 0, task_check_period: float = 0.01, checkpoint_dir: str = "",
                 checkpoint_interval: int = 0, resume: bool = False, on_site_failure: str = "stop",
                 init_timeout: int = INIT_TIMEOUT, transport: str = "poll"):
        super().__init__(sites, train, wire_dtype, task_timeout, on_site_failure, summary_file, num_threads,
                         task_check_period, init_timeout, transport)
        self.persistor_id = persistor_id
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_interval = int(checkpoint_interval)
        self.resume = resume
        if (self.checkpoint_interval or resume) and not checkpoint_dir:
            raise ValueError("checkpoint_interval and resume need a checkpoint_dir")
        self.persistor: ModelPersistor | None = None
        self.checkpoint: ServerCheckpoint | None = None
        self._resumed: dict | None = None  # the checkpoint this run resumes from
        self._train_step = 0  # the training step in progress
        self._last_checkpoint: int | None = None
        self._step_seconds: list[float] = []  # per training step: the round trip and the decoder's step
        self._decoder_seconds: list[float] = []  # per training step: the decoder's step alone
        self._site_seconds: list[float] = []  # per training step: the slowest site's time on its task
        self._resident_mb: list[float] = []  # per training step: the server's resident memory after it
        self._training_peak_mb: float | None = None
        self._cpu: defaultdict[str, CpuPerStep] = defaultdict(CpuPerStep)  # the server and each site process

    # NVFlare life cycle -------------------------------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        self.persistor = fl_ctx.get_engine().get_component(self.persistor_id) if self.persistor_id else None
        if self.persistor_id and not isinstance(self.persistor, ModelPersistor):
            self.system_panic(f"component '{self.persistor_id}' is not a ModelPersistor", fl_ctx)

    def open_checkpoint(self, fl_ctx: FLContext) -> None:
        if self.checkpoint_dir:
            self.checkpoint = ServerCheckpoint(self._checkpoint_path(fl_ctx), self.sites, self.config)

    def _checkpoint_path(self, fl_ctx: FLContext) -> Path:
        root = fl_ctx.get_engine().get_workspace().get_root_dir()
        return inside(root, self.checkpoint_dir, site="server", field="checkpoint_dir") / SERVER_CHECKPOINT

    def load_decoder(self, decoder: torch.nn.Module, fl_ctx: FLContext) -> None:
        """Start from the persistor's checkpoint when it has one (e.g. a preloaded decoder)."""
        if self.persistor is None:
            return
        weights = self.persistor.load(fl_ctx).get("weights") or {}
        if weights:
            decoder.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
            self.log_info(fl_ctx, f"decoder initialised from the persistor ({len(weights)} tensors)")

    def resume_step(self, fl_ctx: FLContext) -> int | None:
        if not self.resume:
            return None
        self._resumed = self.checkpoint.load(self.party)
        if self._resumed is None:
            self.log_info(fl_ctx, f"no checkpoint at {self.checkpoint.path}: starting afresh")
            return None
        self.log_info(fl_ctx, f"resuming after training step {self._resumed['train_step']} from "
                              f"{self.checkpoint.path}")
        return self._resumed["train_step"]

    # The workflow -------------------------------------------------------------------------------------------------
    def run_workflow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        config, start = self.config, time.perf_counter()
        common = self.setup(abort_signal, fl_ctx)
        train_ids, val_ids = split_patients(common, config.val_fraction, config.seed)
        self.log_info(fl_ctx, f"{len(train_ids)} training / {len(val_ids)} validation patients, "
                              f"{config.epochs} epochs, wire {self.wire_dtype}, device {self.party.device}"
                              + (f", patches {config.patch_shape}" if config.patch_shape else ""))
        resumed = self._resumed or {"train_step": 0, "epoch": 0, "losses": [], "history": []}
        gc.collect()
        gc.freeze()  # what set-up made lives for the run: the full collection of every step need not scan it again
        history, metrics = list(resumed["history"]), None
        schedule = Schedule(train_ids, config, len(self.sites))
        for epoch in range(resumed["epoch"], config.epochs):  # epochs before the checkpoint are in its history
            losses = list(resumed["losses"]) if epoch == resumed["epoch"] else []
            for step in schedule.steps(epoch, done=resumed["train_step"]):
                losses.append(self._train_step_of(step, schedule, abort_signal, fl_ctx))
                if self.checkpoint_interval and step.train_step % self.checkpoint_interval == 0:
                    self._save_checkpoint(step.train_step, epoch, losses, history, abort_signal, fl_ctx)
                if step.progress_point:
                    self.log_info(fl_ctx, f"epoch {epoch + 1}/{config.epochs} batch {step.index + 1}/"
                                          f"{step.batches_in_epoch} loss {np.mean(losses):.4f} "
                                          f"({time.perf_counter() - start:.0f} s)")
            train_step = schedule.steps_before(epoch + 1)
            entry = {"epoch": epoch + 1, "step": train_step, "rounds": self.rounds.step,
                     "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - start, 2)}
            self.log_info(fl_ctx, f"epoch {epoch + 1}/{config.epochs} loss {entry['loss']:.4f} "
                                  f"({train_step} steps, {entry['seconds']:.0f} s)")
            if schedule.validates_after(epoch):
                metrics = entry["validation"] = self._validate(val_ids, abort_signal, fl_ctx)
                for region, value in metrics["dice"].items():
                    self._track(f"val/dice_{region}", value, fl_ctx)
                self.log_info(fl_ctx, "validation Dice " + " ".join(f"{k} {v:.3f}" for k, v in metrics["dice"].items()))
            history.append(entry)

        self.rounds.exchange(TASK_FINISH, [], abort_signal, fl_ctx)
        self._save_decoder(fl_ctx)
        self._write_summary(metrics, history, schedule.total_steps, train_ids, val_ids, time.perf_counter() - start,
                            fl_ctx)

    def _train_step_of(self, step: Step, schedule: Schedule, abort_signal: Signal, fl_ctx: FLContext) -> float:
        """One training step: the sites' activations of the batch, the decoder's step, the gradients held for the
        next round. Returns the loss."""
        step_started = time.perf_counter()
        self._train_step = self.rounds.train_step = step.train_step
        # The next batch's patients: every party loads them while this step runs.
        following = schedule.following(step)
        info = {"train_step": step.train_step, "train_steps": schedule.total_steps, "prefetch": following}
        self.labels.prefetch(following)
        if self.config.patch_shape is None:
            labels = self.labels.batch(step.patient_ids)
        else:  # cut from the cached uint8 masks: no float32 copy of whole volumes
            volumes = [self.labels.volume(pid) for pid in step.patient_ids]
            patches = schedule.patches(step, [v[0] for v in volumes] if self.config.patch_sampling == "label" else None)
            info["patches"] = patches.message()
            labels = patches.cut(volumes, mode="nearest")
        absent = None if step.absent is None else self.sites[step.absent]
        features = self.rounds.exchange(TASK_TRAIN, step.patient_ids, abort_signal, fl_ctx, info=info, absent=absent)
        round_done = time.perf_counter()
        self.party.set_learning_rate(learning_rate(self.config, step.train_step))
        loss, gradients = self.party.train_step(features, labels, self.rounds.present(step.absent))
        self._decoder_seconds.append(time.perf_counter() - round_done)
        self._training_peak_mb = peak_memory_mb()  # the peak up to here, before any validation
        # NVFlare's message objects form reference cycles that hold each step's payload buffers until a full
        # collection; collected every step the server stays flat (measured: docs/performance.md). With the
        # set-up frozen, a collection costs ~2 ms instead of ~170 ms.
        gc.collect()
        self._resident_mb.append(resident_memory_mb())
        answered = self.rounds.answered()
        self._mark_cpu(answered)
        self._site_seconds.append(max((self.rounds.reply_info[site].get("busy_seconds", 0.0) for site in answered),
                                      default=0.0))
        self.rounds.hold_gradients(gradients, {"gradient_train_step": step.train_step,
                                               "train_steps": schedule.total_steps})
        del features, gradients  # this step's inputs and their gradients: not kept through the next round
        self._step_seconds.append(time.perf_counter() - step_started)
        self._track("train/loss", loss, fl_ctx)
        return loss

    def _validate(self, val_ids: list[str], abort_signal: Signal, fl_ctx: FLContext) -> dict:
        metrics = RegionMetrics()
        for index, batch_ids in enumerate(chunks(val_ids, self.config.val_batch_size)):
            logits = self.segment(TASK_VALIDATE, batch_ids, abort_signal, fl_ctx)
            masks = logits_to_masks(logits, min_component_voxels=self.config.min_component_voxels)
            truth = torch.as_tensor(self.labels.batch(batch_ids))
            metrics.update(masks, truth, [self.labels.grid_spacing(pid) for pid in batch_ids])
            if index == 0:  # the first validation patient's middle axial slice (the server holds no image)
                middle = truth.shape[-1] // 2
                self.telemetry.overlay("val/segmentation", truth[0, ..., middle].numpy(),
                                       masks[0, ..., middle].cpu().numpy(), self._train_step, fl_ctx)
        return metrics.aggregate()

    # Records ------------------------------------------------------------------------------------------------------
    def _write_summary(self, metrics: dict | None, history: list[dict], train_steps: int, train_ids: list[str],
                       val_ids: list[str], wall_seconds: float, fl_ctx: FLContext) -> None:
        summary = make_summary(
            metrics, epochs=self.config.epochs, steps=train_steps, wall_seconds=wall_seconds,
            config={**self.config.to_dict(), "sites": self.sites, "wire_dtype": self.wire_dtype,
                    "transport": self.transport,
                    "scope": job_scope(fl_ctx), "train_patients": len(train_ids), "val_patients": len(val_ids)},
            # The ids, for choosing the post-processing on training patients only (``split-unet infer``).
            patients={"training": list(train_ids), "validation": list(val_ids)},
            bytes_per_step=self.rounds.bytes_per_step(len(self._step_seconds)), privacy=self.rounds.privacy,
            history=history, lost_sites=self.rounds.lost,
            timing={"step_seconds": [round(s, 4) for s in self._step_seconds],
                    "decoder_seconds": [round(s, 4) for s in self._decoder_seconds],
                    "site_seconds": self._site_seconds,
                    "server_resident_mb": self._resident_mb,
                    "round_trips_per_step": self.rounds.rounds_of[TASK_TRAIN] / max(1, len(self._step_seconds)),
                    "cpu_seconds_per_step": self._cpu_per_step()},
            memory_mb={"server": peak_memory_mb(), "server_training_steps": self._training_peak_mb,
                       "sites": {site: self.rounds.reply_info.get(site, {}).get("peak_memory_mb")
                                 for site in self.sites},
                       "gpu": gpu_peak_mb(self.party.device),
                       "sites_gpu": {site: self.rounds.reply_info.get(site, {}).get("gpu_peak_mb")
                                     for site in self.sites}},
            cpu_seconds={"server": cpu_seconds(),
                         "sites": {site: self.rounds.reply_info.get(site, {}).get("cpu_seconds")
                                   for site in self.sites}},
        )
        self.log_info(fl_ctx, f"summary written to {write_json(self.summary_path, summary)}")

    def failure_record(self) -> dict:
        return {**super().failure_record(), "train_step": self._train_step, "last_checkpoint": self._last_checkpoint}

    def _mark_cpu(self, answered: list[str]) -> None:
        """CPU time so far of the server, of each site's process (its answer reports it) and of the processes that
        relay their messages (each process's parent; in POC NVFlare's server and client processes), each once."""
        self._cpu["server"].mark(cpu_seconds())
        parents = {os.getppid(): process_cpu_seconds(os.getppid())}
        for site in answered:
            report = self.rounds.reply_info[site]
            if "cpu_seconds" in report:
                self._cpu[site].mark(report["cpu_seconds"])
            if "parent_cpu_seconds" in report and "parent_pid" in report:
                parents[int(report["parent_pid"])] = report["parent_cpu_seconds"]
        for pid, seconds in parents.items():
            if seconds is not None and pid != os.getpid():
                self._cpu[f"relay {pid}"].mark(seconds)

    def _cpu_per_step(self) -> dict:
        """CPU seconds per training step of the server and of each site process (``CpuPerStep``), and their total."""
        per_step = {name: tracker.per_step for name, tracker in self._cpu.items() if tracker.per_step is not None}
        return {**per_step, "total": round(sum(per_step.values()), 4)}

    def _track(self, tag: str, value: float, fl_ctx: FLContext) -> None:
        """TensorBoard against the training step (see ``Telemetry``)."""
        self.telemetry.scalar(tag, value, self._train_step, fl_ctx)

    def _save_checkpoint(self, train_step: int, epoch: int, losses: list[float], history: list[dict],
                         abort_signal: Signal, fl_ctx: FLContext) -> None:
        """A round without a batch delivers the sites' gradients of ``train_step``; each saves its checkpoint,
        then the server saves its own: its file always names a step that every site has saved."""
        self.rounds.exchange(TASK_TRAIN, [], abort_signal, fl_ctx, info={"checkpoint": train_step})
        path = self.checkpoint.save(self.party, train_step, epoch, losses, history)
        self._last_checkpoint = train_step
        self.log_info(fl_ctx, f"checkpoint of step {train_step} saved to {path}")

    def _save_decoder(self, fl_ctx: FLContext) -> None:
        if self.persistor is None:
            return
        weights = {k: v.detach().cpu().numpy() for k, v in self.party.decoder.state_dict().items()}
        self.persistor.save(make_model_learnable(weights, {"step": self.rounds.step}), fl_ctx)

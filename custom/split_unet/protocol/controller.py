"""The server's NVFlare Controller: the label holder that runs the decoder and drives every step.

Each step is one round trip: every site gets its own task (the gradient of its previous activations and
the next batch's patient ids) at the same time, answers with its new activations, and the decoder
steps. The learning itself is ``DecoderParty``; this class moves messages, checks them, logs and saves.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.controller_spec import ClientTask, Task, TaskCompletionStatus
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from split_unet.allocator import release_large_blocks
from split_unet.data import DATALIST, MODALITIES, SiteLabels, split_patients
from split_unet.errors import ProtocolError, SplitUNetError
from split_unet.files import write_json
from split_unet.accounting import gaussian_epsilon
from split_unet.ids import check_patient_ids
from split_unet.networks import build_decoder
from split_unet.profiling import (CpuPerStep, cpu_seconds, peak_memory_mb, process_cpu_seconds, resident_memory_mb,
                                  save_profile, start_profile)
from split_unet.reports import make_summary
from split_unet.training import (DecoderParty, RegionMetrics, TrainConfig, chunks, logits_to_masks, present_inputs,
                                 select_device)
from split_unet.training.schedule import Schedule

from .checkpoint import SERVER_CHECKPOINT, ServerCheckpoint
from .codecs import CODECS
from .paths import inside
from .settings import load_site_settings
from .telemetry import Telemetry
from .wire import (KIND_GRADIENTS, KIND_INIT, KIND_SITE_INFO, TASK_FINISH, TASK_INIT, TASK_TRAIN, TASK_VALIDATE,
                   TensorMessage, dxo_of, read_activations)


# Bounds on what a site reports about its own process: beyond them a number is not a measurement
# (1e9 CPU seconds are 31 years, 1e9 MB a petabyte).
REPORT_BOUNDS = {"cpu_seconds": 1e9, "peak_memory_mb": 1e9, "parent_cpu_seconds": 1e9, "parent_pid": 2**31}
# The server recomputes a site's epsilon with the site filter's own function and compares: the same code gives
# the same float; the tolerance only leaves room for another machine's floating-point library.
EPSILON_RELATIVE_TOLERANCE = 1e-6
MAX_RELEASES = 10**9


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}... ({type(value).__name__} of {len(text)} characters)"


def check_site_report(info: Mapping, site: str) -> dict:
    """What the server keeps of the ``info`` a site sends about its own process: CPU seconds and peak memory,
    each a finite number within ``REPORT_BOUNDS``, and (inference) the volumes' geometry, checked where used."""
    report = {}
    for key, bound in REPORT_BOUNDS.items():
        if key in info:
            if not _is_number(info[key]) or not 0 <= info[key] <= bound:
                raise ProtocolError(f"must be a number in [0, {bound:g}], got {_shown(info[key])}", site=site,
                                    field=f"info.{key}")
            report[key] = float(info[key])
    if "geometry" in info:
        report["geometry"] = info["geometry"]
    return report


def check_privacy_report(info: Mapping, site: str, releases_seen: int) -> dict:
    """A site's differential-privacy report (``ActivationClipNoise``): the server recomputes the epsilon from
    the mechanism's declared parameters and refuses a report that differs or that claims fewer releases per
    patient than the server itself received. The server cannot see the noise; it checks the arithmetic."""
    noise, delta, releases, epsilon = (info.get(key) for key in ("dp_noise_multiplier", "dp_delta", "dp_releases",
                                                                  "dp_epsilon"))
    if not _is_number(noise) or noise < 0:
        raise ProtocolError(f"must be a finite number >= 0, got {_shown(noise)}", site=site,
                            field="info.dp_noise_multiplier")
    if not _is_number(delta) or not 0 < delta < 1:
        raise ProtocolError(f"must be a number in (0, 1), got {_shown(delta)}", site=site, field="info.dp_delta")
    if not isinstance(releases, int) or isinstance(releases, bool) or not releases_seen <= releases <= MAX_RELEASES:
        raise ProtocolError(f"must be an integer of at least {releases_seen} (the releases per patient the server "
                            f"received), got {_shown(releases)}", site=site, field="info.dp_releases")
    computed = gaussian_epsilon(noise, releases, delta)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not (
            epsilon == computed or math.isclose(epsilon, computed, rel_tol=EPSILON_RELATIVE_TOLERANCE)):
        raise ProtocolError(f"reported epsilon {_shown(epsilon)} is not the {computed:.6g} of the declared mechanism "
                            f"(noise multiplier {noise}, {releases} releases, delta {delta})", site=site,
                            field="info.dp_epsilon")
    return {"epsilon": computed, "delta": delta, "noise_multiplier": noise, "releases_per_patient": releases}


def protected_levels(info: Mapping, received: Sequence[int], site: str) -> int:
    """How many of the ``received`` levels the site's noise filter says it protected (``dp_levels``)."""
    levels = info.get("dp_levels")
    if levels is None:
        return len(received)
    if not isinstance(levels, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in levels):
        raise ProtocolError(f"must be a list of levels, got {_shown(levels)}", site=site, field="info.dp_levels")
    return len(set(received) & set(levels))


def activation_shapes(config: TrainConfig, batch: int) -> dict[int, tuple[int, ...]]:
    """``{level: (batch, C_l, *S_l)}`` of the activations a site sends (and the gradients it gets back)."""
    net = config.network
    shapes, spatial = {}, config.size
    for level, channels in enumerate(net.channels):
        if level > 0:
            spatial //= net.strides[level - 1]
        if level in net.sent_levels:
            shapes[level] = (batch, channels, *(spatial,) * net.spatial_dims)
    return shapes


def largest_training_tensor(config: TrainConfig) -> int:
    """Elements of the largest tensor of a training step: the bound on anything decoded off a training message."""
    return max(math.prod(shape) for shape in activation_shapes(config, config.batch_size).values())


def refuse_blocked_levels(site: str, blocked: Sequence[int], sent: Sequence[int]) -> None:
    """A site's privacy policy may forbid levels (``LevelBlocking``): refuse the job now, not mid-training."""
    if forbidden := sorted(set(blocked) & set(sent)):
        raise ProtocolError(f"the site's policy blocks levels {forbidden}, but the job's network sends levels "
                            f"{list(sent)}; set train.network.levels without {forbidden}", site=site,
                            field="network.levels")


class SplitUNetController(Controller):
    """Split-learning workflow for the Split-U-Net.

    Args:
        sites: client names in encoder order (site k runs encoder k); default the four MSD modalities.
        train: ``TrainConfig`` fields (epochs, batch_size, lr, seed, size, network, ...).
        wire_dtype: "float32" (exact) or "float16" (half the bytes) for activations and gradients.
        persistor_id: component id of the NVFlare ``ModelPersistor`` that loads/saves the decoder.
        task_timeout: seconds a site may take to answer one task; then it counts as lost (named in the log and
            the summary) and ``on_site_failure`` decides.
        on_site_failure: the job's policy for a lost site (no answer within ``task_timeout``, or NVFlare reports it
            dead): "stop" ends the job (the last complete checkpoint stays for a resume); "continue" trains and
            validates on without that modality, as modality dropout does (train with ``modality_dropout`` so the
            model copes). A site that answers with an error always stops the job.
        summary_file: file name of the results written to the server's run folder (relative, no '..').
        num_threads: torch CPU threads for the server (0: torch's default).
        checkpoint_dir: folder (relative to the server's workspace; absolute paths and '..' are refused) of the
            server's checkpoint;
            the sites keep theirs in their own ``ModalitySiteExecutor(checkpoint_dir=...)``.
        checkpoint_interval: training steps between checkpoints (0: none).
        resume: start from the checkpoint in ``checkpoint_dir`` (if there is one): the same run continues, and
            ``train.epochs`` may be raised to train on.
    """

    def __init__(self, sites: Sequence[str] = MODALITIES, train: dict | None = None, wire_dtype: str = "float32",
                 persistor_id: str = "persistor", task_timeout: int = 600, summary_file: str = "summary.json",
                 num_threads: int = 0, task_check_period: float = 0.01, checkpoint_dir: str = "",
                 checkpoint_interval: int = 0, resume: bool = False, on_site_failure: str = "stop"):
        super().__init__(task_check_period=task_check_period)
        if wire_dtype not in CODECS:
            raise ValueError(f"wire_dtype must be one of {CODECS}, got {wire_dtype!r}")
        if on_site_failure not in ("stop", "continue"):
            raise ValueError(f"on_site_failure must be 'stop' or 'continue', got {on_site_failure!r}")
        self.sites = list(sites)
        self.on_site_failure = on_site_failure
        self._lost: dict[str, dict] = {}  # sites lost during the run (policy "continue"): when and why
        self.config = TrainConfig.from_dict(train or {})
        # As given: NVFlare's Job API writes a component's arguments from its attributes of the same name.
        self.train = dict(train or {})
        self.wire_dtype = wire_dtype
        self.persistor_id = persistor_id
        self.task_timeout = int(task_timeout)
        self.summary_file = summary_file
        self.num_threads = num_threads
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_interval = int(checkpoint_interval)
        self.resume = resume
        if (self.checkpoint_interval or resume) and not checkpoint_dir:
            raise ValueError("checkpoint_interval and resume need a checkpoint_dir")
        self._resumed: dict | None = None  # the checkpoint this run resumes from
        self.persistor: ModelPersistor | None = None
        self.party: DecoderParty | None = None
        self.labels: SiteLabels | None = None
        self.run_dir: Path | None = None
        self.summary_path: Path | None = None
        self._gradients: dict[str, dict[int, torch.Tensor]] = {}
        self._gradient_step: int | None = None
        self._gradient_info: dict = {}
        # Bytes as on the wire, per site: "to_server" (activations of training steps), "to_site" (all payloads).
        self._bytes = {site: {"to_server": 0, "to_site": 0} for site in self.sites}
        self._step = 0  # rounds of any task
        self._train_rounds = 0  # rounds of the training task (one per step, plus checkpoint rounds)
        self._step_seconds: list[float] = []  # per training step: the round trip and the decoder's step
        self._decoder_seconds: list[float] = []  # per training step: the decoder's step alone
        self._resident_mb: list[float] = []  # per training step: the server's resident memory after it
        self._training_peak_mb: float | None = None
        self._cpu: defaultdict[str, CpuPerStep] = defaultdict(CpuPerStep)  # the server and each site process
        self._train_step = 0  # the training step in progress
        self._last_checkpoint: int | None = None
        self.reply_info: dict[str, dict] = {}
        self.telemetry = Telemetry(self)
        self._privacy: dict[str, dict] = {}
        self._released: defaultdict[str, Counter] = defaultdict(Counter)  # per site: patient -> protected releases
        self._agreed: list[str] | None = None  # announced to the sites with the next round, then None

    # NVFlare life cycle -------------------------------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        start_profile()
        release_large_blocks()  # the resident memory stays flat across steps (see split_unet.allocator)
        engine = fl_ctx.get_engine()
        self.run_dir = Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()))
        self.telemetry.start(self.run_dir)
        self.persistor = engine.get_component(self.persistor_id) if self.persistor_id else None
        if self.persistor_id and not isinstance(self.persistor, ModelPersistor):
            self.system_panic(f"component '{self.persistor_id}' is not a ModelPersistor", fl_ctx)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        self.cancel_all_tasks()

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignored a late result of task '{task_name}' from {client.name}")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        try:
            # Every path the job names stays in the server's own run folder and workspace; a bad one ends the
            # job before anything is written.
            summary_path = inside(self.run_dir, self.summary_file, site="server", field="summary_file",
                                  where="run folder")
            if self.checkpoint_dir:
                self._checkpoint_path(fl_ctx)
            self.summary_path = summary_path
            self.run_workflow(abort_signal, fl_ctx)
            save_profile("server")
        except SplitUNetError as error:
            self._fail(str(error), fl_ctx)
        except Exception as error:  # any failure ends the job with its reason instead of hanging
            self.log_exception(fl_ctx, "split learning failed")
            self._fail(f"{type(error).__name__}: {error}", fl_ctx)

    # The workflow -------------------------------------------------------------------------------------------------
    def run_workflow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        """The job's work: training here, inference in ``SplitInferenceController``."""
        self._train(abort_signal, fl_ctx)

    def _setup(self, abort_signal: Signal, fl_ctx: FLContext, labels_required: bool = True) -> list[str]:
        """Labels, decoder and sites ready; returns the patients every site (and, if required, the server) holds."""
        config = self.config
        settings = load_site_settings("server", fl_ctx.get_engine().get_workspace().get_root_dir())
        if labels_required or (Path(settings["data_dir"]) / DATALIST).is_file():
            self.labels = SiteLabels(settings["data_dir"], config.size, config.spacing, site="server")
            self.labels.check()
        decoder = build_decoder(config.network, len(self.sites), config.seed)
        self._load_decoder(decoder, fl_ctx)
        self.party = DecoderParty(decoder, config.lr, select_device(config.device), config.micro_batches,
                                  config.decoder_checkpointing)
        self._resumed = self._load_checkpoint(fl_ctx) if self.resume else None

        site_ids = self._initialize_sites(abort_signal, fl_ctx)
        common = set.intersection(*(set(ids) for ids in site_ids.values()))
        if labels_required:
            common &= set(self.labels.patient_ids)
        for site, ids in site_ids.items():
            if missing := set(ids) - common:
                self.log_info(fl_ctx, f"site {site}: {len(missing)} patients not held by every party are ignored")
        if not common:
            raise ProtocolError("no patient is held by every site" + (" and the server" if labels_required else ""),
                                site="server", field="patient_ids")
        self._agreed = sorted(common)
        return self._agreed

    def _train(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        config, start = self.config, time.perf_counter()
        train_ids, val_ids = split_patients(self._setup(abort_signal, fl_ctx), config.val_fraction, config.seed)
        self.log_info(fl_ctx, f"{len(train_ids)} training / {len(val_ids)} validation patients, "
                              f"{config.epochs} epochs, wire {self.wire_dtype}, device {self.party.device}")

        resumed = self._resumed or {"train_step": 0, "epoch": 0, "losses": [], "history": []}
        gc.collect()
        gc.freeze()  # what set-up made lives for the run: the full collection of every step need not scan it again
        history, metrics = list(resumed["history"]), None
        schedule = Schedule(train_ids, config, len(self.sites))
        train_steps = schedule.total_steps
        for epoch in range(resumed["epoch"], config.epochs):  # epochs before the checkpoint are in its history
            losses = list(resumed["losses"]) if epoch == resumed["epoch"] else []
            for step in schedule.steps(epoch, done=resumed["train_step"]):
                train_step, absent = step.train_step, step.absent
                step_started = time.perf_counter()
                self._train_step = train_step
                features = self._round(TASK_TRAIN, step.patient_ids, abort_signal, fl_ctx,
                                       info={"train_step": train_step, "train_steps": train_steps},
                                       absent=None if absent is None else self.sites[absent])
                round_done = time.perf_counter()
                loss, gradients = self.party.train_step(features, self.labels.batch(step.patient_ids),
                                                        self._present(absent))
                self._decoder_seconds.append(time.perf_counter() - round_done)
                self._training_peak_mb = peak_memory_mb()  # the peak up to here, before any validation
                # NVFlare's message objects form reference cycles that hold each step's payload buffers until a full
                # collection; collected every step the server stays flat (measured: docs/performance/wire.md). With
                # the set-up frozen above, a collection costs ~2 ms instead of ~170 ms.
                gc.collect()
                self._resident_mb.append(resident_memory_mb())
                answered = [site for site in self.sites if site in self.reply_info and site not in self._lost]
                self._mark_cpu(answered)
                self._gradients = dict(zip(self.sites, gradients))
                del features, gradients  # this step's inputs and their gradients: not kept through the next round
                self._gradient_step = self._step
                self._gradient_info = {"gradient_train_step": train_step, "train_steps": train_steps}
                losses.append(loss)
                self._step_seconds.append(time.perf_counter() - step_started)
                self._track("train/loss", loss, fl_ctx)
                if self.checkpoint_interval and train_step % self.checkpoint_interval == 0:
                    self._save_checkpoint(train_step, epoch, losses, history, abort_signal, fl_ctx)
                if step.progress_point:
                    self.log_info(fl_ctx, f"epoch {epoch + 1}/{config.epochs} batch {step.index + 1}/"
                                          f"{step.batches_in_epoch} loss {np.mean(losses):.4f} "
                                          f"({time.perf_counter() - start:.0f} s)")
            train_step = schedule.steps_before(epoch + 1)
            entry = {"epoch": epoch + 1, "step": train_step, "rounds": self._step, "loss": float(np.mean(losses)),
                     "seconds": round(time.perf_counter() - start, 2)}
            self.log_info(fl_ctx, f"epoch {epoch + 1}/{config.epochs} loss {entry['loss']:.4f} "
                                  f"({train_step} steps, {entry['seconds']:.0f} s)")
            if schedule.validates_after(epoch):
                metrics = entry["validation"] = self._validate(val_ids, abort_signal, fl_ctx)
                for region, value in metrics["dice"].items():
                    self._track(f"val/dice_{region}", value, fl_ctx)
                self.log_info(fl_ctx, "validation Dice " + " ".join(f"{k} {v:.3f}" for k, v in metrics["dice"].items()))
            history.append(entry)

        self._round(TASK_FINISH, [], abort_signal, fl_ctx)
        self._save_decoder(fl_ctx)
        summary = make_summary(
            metrics, epochs=config.epochs, steps=train_steps, wall_seconds=time.perf_counter() - start,
            config={**config.to_dict(), "sites": self.sites, "wire_dtype": self.wire_dtype,
                    "train_patients": len(train_ids), "val_patients": len(val_ids)},
            bytes_per_step=self._bytes_per_step(), privacy=self._privacy, history=history, lost_sites=self._lost,
            timing={"step_seconds": [round(s, 4) for s in self._step_seconds],
                    "decoder_seconds": [round(s, 4) for s in self._decoder_seconds],
                    "server_resident_mb": self._resident_mb,
                    "round_trips_per_step": self._train_rounds / max(1, len(self._step_seconds)),
                    "cpu_seconds_per_step": self._cpu_per_step()},
            memory_mb={"server": peak_memory_mb(), "server_training_steps": self._training_peak_mb,
                       "sites": {site: self.reply_info.get(site, {}).get("peak_memory_mb") for site in self.sites}},
            cpu_seconds={"server": cpu_seconds(),
                         "sites": {site: self.reply_info.get(site, {}).get("cpu_seconds") for site in self.sites}},
        )
        path = write_json(self.summary_path, summary)
        self.log_info(fl_ctx, f"summary written to {path}")

    def _initialize_sites(self, abort_signal: Signal, fl_ctx: FLContext) -> dict[str, list[str]]:
        """Send every site the run configuration; collect the patient ids it holds."""
        payloads = {
            site: DXO(KIND_INIT, data={"train": self.config.to_dict(), "site_index": index,
                                       "wire_dtype": self.wire_dtype,
                                       "resume_step": self._resumed["train_step"] if self._resumed else None
                                       }).to_shareable()
            for index, site in enumerate(self.sites)
        }
        replies = self._broadcast(TASK_INIT, payloads, abort_signal, fl_ctx)
        site_ids = {}
        for site, reply in replies.items():
            info = dxo_of(reply, KIND_SITE_INFO, site=site).data
            site_ids[site] = check_patient_ids(info.get("patient_ids"), site=site, field="patient_ids",
                                               error=ProtocolError)
            if info.get("modality") not in MODALITIES:
                raise ProtocolError(f"unknown modality {_shown(info.get('modality'))}", site=site, field="modality")
            blocked = info.get("blocked_levels", [])
            if not isinstance(blocked, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in blocked):
                raise ProtocolError(f"must be a list of levels, got {_shown(blocked)}", site=site,
                                    field="blocked_levels")
            self.log_info(fl_ctx, f"site {site}: modality {info['modality']}, {len(site_ids[site])} patients")
            refuse_blocked_levels(site, blocked, self.config.network.sent_levels)
        return site_ids

    def _round(self, task_name: str, patient_ids: list[str], abort_signal: Signal, fl_ctx: FLContext,
               info: dict | None = None, absent: str | None = None) -> list[dict[int, torch.Tensor]]:
        """One round trip: pending gradients + next batch out, checked activations back, in site order.

        The ``absent`` site (modality dropout) only gets its pending gradient, no batch, and answers with no
        features (an empty dict in its place). The sites' ``info`` of their answers stays in
        ``self.reply_info`` until the next round.
        """
        self._step += 1
        active = [site for site in self.sites if site not in self._lost]
        payloads, requested = {}, {site: [] if site == absent else patient_ids for site in active}
        info = {**(info or {}), **(self._gradient_info if self._gradients else {})}
        if self._agreed is not None:  # once, with the first batch: sites then refuse any other patient
            info["agreed_patients"], self._agreed = self._agreed, None
        for site in active:
            message = TensorMessage(KIND_GRADIENTS, self._step, requested[site], self._gradients.get(site, {}),
                                    tensor_step=self._gradient_step if self._gradients else None, info=info)
            payloads[site], n_bytes = message.to_shareable(self.wire_dtype)
            self._bytes[site]["to_site"] += n_bytes
        self._train_rounds += task_name == TASK_TRAIN
        self._gradients, self._gradient_step, self._gradient_info = {}, None, {}
        replies = self._broadcast(task_name, payloads, abort_signal, fl_ctx)
        features = []
        for site in self.sites:
            if site not in replies:  # lost: nothing from it, in this round or since an earlier one
                features.append({})
                continue
            ids = requested[site]
            message = read_activations(replies[site], site=site, step=self._step, patient_ids=ids,
                                       expected=activation_shapes(self.config, len(ids)) if ids else {})
            self.reply_info[site] = check_site_report(message.info, site)
            if any(key.startswith("dp_") for key in message.info):  # a site's ActivationClipNoise reports its budget
                released, levels = self._released[site], protected_levels(message.info, list(message.tensors), site)
                for pid in message.patient_ids:
                    released[pid] += levels
                self._privacy[site] = check_privacy_report(message.info, site, max(released.values(), default=0))
            if task_name == TASK_TRAIN:
                self._bytes[site]["to_server"] += message.wire_bytes
            features.append(message.tensors)
        return features

    def _broadcast(self, task_name: str, payloads: dict[str, Shareable], abort_signal: Signal,
                   fl_ctx: FLContext) -> dict[str, Shareable]:
        """Every site its own task, all in flight at once; wait for all of them. A site that does not answer is
        lost (``_lose_site``): the job stops, or the round goes on with the others' replies."""
        tasks = {site: Task(task_name, data, timeout=self.task_timeout) for site, data in payloads.items()}
        for site, task in tasks.items():
            self.broadcast(task, fl_ctx, targets=[site], min_responses=1)
        replies = {}
        for site, task in tasks.items():
            self.communicator.wait_for_task(task, abort_signal)
            if abort_signal.triggered:  # NVFlare's decision; its server log names the cause
                raise ProtocolError("NVFlare aborted the job (it fails a job whose process at a site ends, naming the "
                                    "site in the server's log; or an admin aborted it)", field=task_name)
            client_tasks: list[ClientTask] = task.client_tasks
            result = client_tasks[0].result if client_tasks else None
            if result is None:
                reason = ("no answer within the task timeout of %d s" % self.task_timeout
                          if task.completion_status == TaskCompletionStatus.TIMEOUT
                          else f"task ended with status {task.completion_status}")
                self._lose_site(site, reason, task_name, fl_ctx)
                continue
            replies[site] = result
        return replies

    def _lose_site(self, site: str, reason: str, task_name: str, fl_ctx: FLContext) -> None:
        """Apply the job's ``on_site_failure`` policy to a site that did not answer."""
        if self.on_site_failure == "stop" or task_name == TASK_INIT:
            raise ProtocolError(reason, site=site, field=task_name)
        self._lost[site] = {"reason": reason, "task": task_name, "round": self._step, "train_step": self._train_step,
                            "detected_at": time.time()}
        if len(self._lost) == len(self.sites):
            raise ProtocolError(f"every site is lost, the last one: {reason}", site=site, field=task_name)
        self.log_warning(fl_ctx, f"site {site} lost at training step {self._train_step} ({reason}); going on "
                                 f"without its modality (policy on_site_failure=continue)")

    def _present(self, absent: int | None = None) -> list[bool] | None:
        """The fusion's mask: every site but the lost ones and the one left out by modality dropout."""
        left_out = {self.sites.index(site) for site in self._lost} | ({absent} if absent is not None else set())
        return present_inputs(left_out, len(self.sites))

    def _validate(self, val_ids: list[str], abort_signal: Signal, fl_ctx: FLContext) -> dict:
        metrics = RegionMetrics()
        for batch_ids in chunks(val_ids, self.config.val_batch_size):
            features = self._round(TASK_VALIDATE, batch_ids, abort_signal, fl_ctx)
            logits = self.party.predict(features, self._present())
            metrics.update(logits_to_masks(logits, min_component_voxels=self.config.min_component_voxels),
                           torch.as_tensor(self.labels.batch(batch_ids)),
                           [self.labels.grid_spacing(pid) for pid in batch_ids])
        return metrics.aggregate()

    # Helpers ------------------------------------------------------------------------------------------------------
    def _mark_cpu(self, answered: list[str]) -> None:
        """CPU time so far of the server, of each site's process (its answer reports it) and of the processes that
        relay their messages (each process's parent; in POC NVFlare's server and client processes), each once."""
        self._cpu["server"].mark(cpu_seconds())
        parents = {os.getppid(): process_cpu_seconds(os.getppid())}
        for site in answered:
            report = self.reply_info[site]
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

    def _bytes_per_step(self) -> dict:
        """Tensor bytes of one training step as on the wire: activations received and gradients sent, all sites
        and per site (each direction); the tensors of the validation rounds are left out."""
        steps = max(1, len(self._step_seconds))
        per_site = {site: {direction: int(n / steps) for direction, n in counts.items()}
                    for site, counts in self._bytes.items()}
        activations = sum(counts["to_server"] for counts in per_site.values())
        gradients = sum(counts["to_site"] for counts in per_site.values())
        return {"activations": activations, "gradients": gradients, "total": activations + gradients,
                "codec": self.wire_dtype, "per_site": per_site}

    def _track(self, tag: str, value: float, fl_ctx: FLContext) -> None:
        """TensorBoard against the training step (see ``Telemetry``)."""
        self.telemetry.scalar(tag, value, self._train_step, fl_ctx)

    # Every message logged is also a progress event (see ``Telemetry``).
    def log_info(self, fl_ctx: FLContext, msg: str, fire_event=False):
        super().log_info(fl_ctx, msg, fire_event)
        self.telemetry.progress("info", msg)

    def log_warning(self, fl_ctx: FLContext, msg: str, fire_event=True):
        super().log_warning(fl_ctx, msg, fire_event)
        self.telemetry.progress("warning", msg)

    def log_error(self, fl_ctx: FLContext, msg: str, fire_event=True):
        super().log_error(fl_ctx, msg, fire_event)
        self.telemetry.progress("error", msg)

    def _load_decoder(self, decoder: torch.nn.Module, fl_ctx: FLContext) -> None:
        """Start from the persistor's checkpoint when it has one (e.g. a preloaded decoder)."""
        if self.persistor is None:
            return
        weights = self.persistor.load(fl_ctx).get("weights") or {}
        if weights:
            decoder.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
            self.log_info(fl_ctx, f"decoder initialised from the persistor ({len(weights)} tensors)")

    def _checkpoint_path(self, fl_ctx: FLContext) -> Path:
        root = fl_ctx.get_engine().get_workspace().get_root_dir()
        return inside(root, self.checkpoint_dir, site="server", field="checkpoint_dir") / SERVER_CHECKPOINT

    def _save_checkpoint(self, train_step: int, epoch: int, losses: list[float], history: list[dict],
                         abort_signal: Signal, fl_ctx: FLContext) -> None:
        """A round without a batch delivers the sites' gradients of ``train_step``; each saves its checkpoint,
        then the server saves its own: its file always names a step that every site has saved."""
        self._round(TASK_TRAIN, [], abort_signal, fl_ctx, info={"checkpoint": train_step})
        path = self._checkpoint(fl_ctx).save(self.party, train_step, epoch, losses, history)
        self._last_checkpoint = train_step
        self.log_info(fl_ctx, f"checkpoint of step {train_step} saved to {path}")

    def _load_checkpoint(self, fl_ctx: FLContext) -> dict | None:
        checkpoint = self._checkpoint(fl_ctx)
        state = checkpoint.load(self.party)
        self.log_info(fl_ctx, f"no checkpoint at {checkpoint.path}: starting afresh" if state is None else
                      f"resuming after training step {state['train_step']} from {checkpoint.path}")
        return state

    def _checkpoint(self, fl_ctx: FLContext) -> ServerCheckpoint:
        return ServerCheckpoint(self._checkpoint_path(fl_ctx), self.sites, self.config)

    def _save_decoder(self, fl_ctx: FLContext) -> None:
        if self.persistor is None:
            return
        weights = {k: v.detach().cpu().numpy() for k, v in self.party.decoder.state_dict().items()}
        self.persistor.save(make_model_learnable(weights, {"step": self._step}), fl_ctx)

    def _fail(self, reason: str, fl_ctx: FLContext) -> None:
        """Record why the run ended and stop the job (nothing already saved is touched)."""
        self.log_error(fl_ctx, f"split learning stopped: {reason}")
        if self.summary_path is not None:
            write_json(self.summary_path, {
                "error": reason, "rounds_done": self._step, "train_step": self._train_step,
                "last_checkpoint": self._last_checkpoint, "failed_at": time.time(), "lost_sites": self._lost})
        self.cancel_all_tasks()
        self.system_panic(reason, fl_ctx)

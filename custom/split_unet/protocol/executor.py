"""The site's NVFlare Executor: a thin wrapper that feeds the wire messages to an ``EncoderParty``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.private.privacy_manager import PrivacyService

from split_unet.data import SiteImages
from split_unet.errors import ProtocolError, SplitUNetError
from split_unet.files import save_atomically
from split_unet.ids import check_patient_ids, is_integer
from split_unet.leakage.record import snapshot_path
from split_unet.networks import build_encoder, build_inversion_decoder
from split_unet.profiling import cpu_seconds, peak_memory_mb, process_cpu_seconds, save_profile, start_profile
from split_unet.training import (EncoderParty, InversionAdversary, TrainConfig, chunks, gpu_peak_mb, mean_image,
                                 select_device, warmup_batches)
from split_unet.training.augment import intensity_augment, intensity_seed
from split_unet.training.patches import check_patch_starts, cut_patch, sample_patch_starts
from split_unet.training.schedule import PatchBatch, learning_rate
from split_unet.training.sliding_window import empty_window_flags

from .checkpoint import load_checkpoint, save_site_checkpoint, site_checkpoint
from .codecs import check_compression
from .names import ENCODER_FILE
from .nvflare_workarounds import screen_pushed_tasks, short_received_buffer_repr
from .paths import inside
from .psi import intersection_path, read_intersection
from .settings import job_scope, load_site_settings
from .telemetry import SiteTelemetry
from .wire import (KIND_ACTIVATIONS, KIND_INIT, KIND_REQUEST, KIND_SITE_INFO, TASK_FINISH, TASK_INFER, TASK_INIT,
                   TASK_TRAIN, TASK_VALIDATE, TensorMessage, dxo_of, error_reply, selected_step)


def check_privacy_scope(fl_ctx: FLContext, site: str) -> None:
    """Refuse a job whose privacy scope this site does not define.

    NVFlare applies this rule when it deploys a job in POC and production; the simulator skips it and
    would run the job under no scope, so the site checks again here.
    """
    scope = job_scope(fl_ctx)
    if not scope:
        return
    # NVFlare lets any scope pass at a site without a policy; a job that names one expects its filters.
    if not PrivacyService.is_policy_defined():
        raise ProtocolError(f"the job asks for privacy scope '{scope}', but this site has no privacy policy "
                            f"(local/privacy.json)", site=site, field="scope")
    if not PrivacyService.is_scope_allowed(scope):
        raise ProtocolError(f"the job asks for privacy scope '{scope}', which this site's privacy policy does not "
                            f"define", site=site, field="scope")


def check_psi_policy(settings: dict, psi_job_id: str, site: str) -> None:
    """A site whose settings say ``"require_psi": true`` refuses a job that would learn its full patient list."""
    if settings.get("require_psi") and not psi_job_id:
        raise ProtocolError("this site's policy requires a PSI job (psi_job_id) before training, so that the "
                            "server learns only the patients every party holds", site=site, field="psi_job_id")


@dataclass
class ReceivedRequest:
    """A checked request of the server (train, validate, infer, finish) whose gradient the site has applied."""

    request: TensorMessage
    agreed: set[str] | None  # the patients every party holds, once announced
    read_inputs: Callable[[], np.ndarray]  # reads the requested inputs (checked, not yet read)
    prefetch: list[str]  # the next batch's patients, to load while the server works
    received_at: float  # ``time.perf_counter()`` at the executor's receipt of the task


class ModalitySiteExecutor(Executor):
    """Runs one site's encoder on its own modality; only activations leave the site.

    The init task sets the site up (``_initialize``). Every later task is received and checked in one place
    (``_receive``: its step, patients and inputs, then the gradient it carries applied), then answered by its own
    handler: ``_train``, ``_validate`` (also inference: the source grids went to the server at init), ``_finish``.

    Every path the job names is relative to the site's run folder (``encoder_file``) or workspace (the others),
    ``{site}`` replaced by the site name; absolute paths and '..' are refused (``paths.inside``).

    Args:
        encoder_file: file name, in the site's run folder, of the trained encoder saved at the end.
        num_threads: torch CPU threads for this site (0: torch's default).
        snapshot_steps: for a leakage evaluation only: training steps (-1 = the last) at which the site keeps
            its encoder weights in its own run folder (``encoder_snapshots/``). Empty in production.
        psi_job_id: the id of a PSI job this site ran (``jobs/split_unet_psi``): use only the patients of its
            intersection. Empty: every patient the site holds.
        encoder_path: a trained encoder to start from (inference), e.g. ``<training job id>/`` and ``names.ENCODER_FILE``.
        checkpoint_dir: folder of this site's training checkpoints, which the server asks for
            (``SplitUNetController(checkpoint_interval=...)``) and resumes from. Empty: no checkpoints.
    """

    def __init__(self, encoder_file: str = ENCODER_FILE, num_threads: int = 0,
                 snapshot_steps: Sequence[int] = (), psi_job_id: str = "", encoder_path: str = "",
                 checkpoint_dir: str = ""):
        super().__init__()
        self.encoder_file = encoder_file
        self.num_threads = num_threads
        self.snapshot_steps = list(snapshot_steps)
        self.psi_job_id = psi_job_id
        self.encoder_path = encoder_path
        self.checkpoint_dir = checkpoint_dir
        self.party: EncoderParty | None = None
        self.site_telemetry: SiteTelemetry | None = None
        self.config: TrainConfig | None = None
        self.images: SiteImages | None = None
        self.wire_dtype = "float32"
        self.last_step = -1
        self.pending_step: int | None = None
        self.run_config: dict = {}
        self.agreed: set[str] | None = None  # the patients every party holds, once the server announced them
        self.job_sites: set[str] = set()  # the clients of the running job: none of them may task this site

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            self.job_sites = {client.name for client in engine.get_clients()}
            screen_pushed_tasks(engine, self.refuse_foreign_sender)
        if event_type == EventType.END_RUN and self.images is not None:
            self.images.close()  # the prefetch thread ends with the run (inference has no finish task)

    def refuse_foreign_sender(self, request: Shareable, fl_ctx: FLContext) -> Shareable | None:
        """Only the server may task this site: a task pushed by a site of the job (or by a sender that does not
        name itself) is refused before the site's filters or this executor see it, so it changes nothing here.

        The sender is the name NVFlare's aux channel carries with the request (the sending process's context);
        any site's code that pushes a task through NVFlare is named so and refused. A site whose NVFlare itself is
        altered to claim the server's name is beyond this check: NVFlare 2.9 does not hand a request's
        authenticated origin (its cell) to the job's code.
        """
        peer = fl_ctx.get_peer_context()
        sender = peer.get_identity_name() if peer is not None else None
        if sender and sender not in self.job_sites:
            return None
        site = fl_ctx.get_identity_name()
        error = ProtocolError(f"refused task '{request.get_header(ReservedHeaderKey.TASK_NAME)}' from '{sender}': "
                              f"only the server may task a site", site=site, field="sender")
        self.log_error(fl_ctx, str(error))
        return error_reply(str(error))

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            if task_name == TASK_INIT:
                return self._initialize(shareable, fl_ctx, site)
            handler = {TASK_TRAIN: self._train, TASK_VALIDATE: self._validate, TASK_INFER: self._validate,
                       TASK_FINISH: self._finish}.get(task_name)
            if handler is None:
                return make_reply(ReturnCode.TASK_UNKNOWN)
            return handler(self._receive(task_name, shareable, fl_ctx, site), fl_ctx, site)
        except SplitUNetError as error:
            self.log_error(fl_ctx, str(error))
            return error_reply(str(error))
        except Exception as error:  # report any failure to the server instead of leaving it waiting
            self.log_exception(fl_ctx, f"task {task_name} failed")
            return error_reply(f"site '{site}', task '{task_name}': {type(error).__name__}: {error}")

    def _initialize(self, shareable: Shareable, fl_ctx: FLContext, site: str) -> Shareable:
        request = dxo_of(shareable, KIND_INIT, site=site).data
        check_privacy_scope(fl_ctx, site)
        config = TrainConfig.from_dict(request["train"])
        check_compression(config.activation_compression, "activation_compression")  # before the first reply
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        start_profile()
        short_received_buffer_repr()  # NVFlare formats every received payload for a debug line otherwise
        root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        settings = load_site_settings(site, root)
        check_psi_policy(settings, self.psi_job_id, site)
        # Every path the job names, checked before any data is read.
        inside(self._run_dir(fl_ctx), self.encoder_file, site=site, field="encoder_file", where="run folder")
        encoder_path = inside(root, self.encoder_path, site=site, field="encoder_path") if self.encoder_path else None
        if self.checkpoint_dir:
            self._checkpoint_folder(root, site)
        if self.psi_job_id:
            intersection_path(root, self.psi_job_id, site)
        self.images = SiteImages(settings["data_dir"], config.size, config.spacing, site=site,
                                 cache_cases=config.cache_cases)
        if self.psi_job_id:
            self.images.keep(read_intersection(root, self.psi_job_id, site))
        if "modality" in settings and settings["modality"] != self.images.modality:
            raise ProtocolError(f"settings say modality '{settings['modality']}' but the datalist holds "
                                f"'{self.images.modality}'", site=site, field="modality")
        self.log_info(fl_ctx, f"checking {len(self.images.patient_ids)} {self.images.modality} volumes "
                              f"in {settings['data_dir']}")
        self.images.check()
        encoder = build_encoder(config.network, int(request["site_index"]), config.seed)
        if encoder_path is not None:
            encoder.load_state_dict(load_checkpoint(encoder_path, site=site, field="encoder_path")["encoder"])
            self.log_info(fl_ctx, f"encoder loaded from {encoder_path}")
        if self.site_telemetry is not None:
            self.site_telemetry.close()
        # The site's own figures (its privacy terms) in its own run folder: nothing of them leaves the site.
        private_terms = config.nopeek_weight > 0 or config.adversarial_weight > 0
        self.site_telemetry = SiteTelemetry(self._run_dir(fl_ctx)) if private_terms else None
        device = select_device(config.device)
        adversary = None
        if config.adversarial_weight > 0:  # the site's own inversion decoder, steered to the site's mean image
            atlas = mean_image(self.images.batch(ids) for ids in chunks(self.images.patient_ids, config.batch_size))
            adversary = InversionAdversary(build_inversion_decoder(config.network, int(request["site_index"]),
                                                                   config.seed), atlas, config.lr, device)
        self.party = EncoderParty(encoder, config.lr, device, site=site, nopeek_weight=config.nopeek_weight,
                                  seed=config.seed, amp=config.amp, adversary=adversary,
                                  adversarial_weight=config.adversarial_weight, nopeek_levels=config.nopeek_levels)
        self.config = config
        self.wire_dtype = request["wire_dtype"]
        self.run_config = {"train": config.to_dict(), "site_index": int(request["site_index"]),
                           "modality": self.images.modality}
        if request.get("resume_step") is not None:
            self._resume(request["resume_step"], root, site, fl_ctx)
        self.last_step, self.pending_step, self.agreed = -1, None, None
        # Each patient's source grid (header data, checked above), which the server compares across the parties:
        # a volume of another shape or position at one site would otherwise train unnoticed.
        geometry = {pid: {"affine": affine.tolist(), "shape": list(shape),
                          "file": self.images.path(pid).relative_to(self.images.site_dir).as_posix()}
                    for pid in self.images.patient_ids for affine, shape in [self.images.geometry(pid)]}
        info = {"patient_ids": self.images.patient_ids, "modality": self.images.modality, "geometry": geometry}
        return DXO(data_kind=KIND_SITE_INFO, data=info).to_shareable()

    # The tasks after init: one shared receipt, then the task's own handler --------------------------------------------
    def _receive(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, site: str) -> ReceivedRequest:
        """Every task after init: the server's request decoded and checked (its step, the gradient it carries, its
        patients, inputs and prefetch), then the gradient applied and any checkpoint saved."""
        received_at = time.perf_counter()
        if self.party is None:
            raise ProtocolError(f"task '{task_name}' before '{TASK_INIT}'", site=site, field="task")
        # Gradients may only be as large as the activations waiting for them; nothing else is decoded.
        request = TensorMessage.from_shareable(shareable, KIND_REQUEST, site=site,
                                               max_elements=self.party.largest_pending)
        self._check_order(task_name, request, fl_ctx, site)
        agreed = self._check_patients(task_name, request, site)
        read_inputs = self._inputs_of(task_name, request, site)
        prefetch = self._check_prefetch(request, agreed, site)
        # Every check above comes before the site changes: a refused message leaves it as it was, so the
        # server's correct retry is accepted. ``backward`` refuses mismatched gradients before it steps.
        if request.tensors:
            self.party.backward(request.tensors)
            self.pending_step = None
            train_step = request.info.get("gradient_train_step")
            if self.site_telemetry is not None and is_integer(train_step):
                self._log_privacy_terms(train_step)
        self.agreed, self.last_step = agreed, request.step
        if "checkpoint" in request.info:
            self._save_checkpoint(request.info["checkpoint"], fl_ctx, site)
        return ReceivedRequest(request, agreed, read_inputs, prefetch, received_at)

    def _train(self, received: ReceivedRequest, fl_ctx: FLContext, site: str) -> Shareable:
        """Activations of the training batch; a request without patients only delivered the gradient (a site left
        out of the step by modality dropout)."""
        request, features = received.request, {}
        if request.patient_ids:
            if self.config.privacy_warmup_steps and not self.party.warmed_up:  # before the first release
                self._warm_up(received.agreed, fl_ctx)
            train_step = request.info.get("train_step")
            if not is_integer(train_step) or train_step < 1:
                raise ProtocolError(f"must be a positive integer, got {str(train_step)[:60]}", site=site,
                                    field="info.train_step")
            self.party.set_learning_rate(learning_rate(self.config, train_step))  # the server's, from the step
            self._snapshot(request, fl_ctx)
            features = self.party.forward(received.read_inputs())
            self.pending_step = request.step
        return self._answer(request, features, self._end_step(received))

    def _validate(self, received: ReceivedRequest, fl_ctx: FLContext, site: str) -> Shareable:
        """Activations of validation or inference patients (or windows of one), computed without a gradient.
        Windows come with ``empty_windows``: which of them are 0 throughout at this site (the server answers a
        window empty at every site as background). It tells the server nothing new: the encoder's activations of
        an all-zero window are the same for every such window."""
        inputs = received.read_inputs()
        features = self.party.infer(inputs)
        report = self._end_step(received)
        if "windows" in received.request.info:
            report["empty_windows"] = empty_window_flags(inputs)
        return self._answer(received.request, features, report)

    def _finish(self, received: ReceivedRequest, fl_ctx: FLContext, site: str) -> Shareable:
        """The last gradient is applied: the encoder is saved in the site's run folder; the report adds the peak
        memory."""
        report = self._end_step(received)
        self.images.close()
        self._save_encoder(fl_ctx)
        if self.site_telemetry is not None:
            self.site_telemetry.close()
        report["peak_memory_mb"] = peak_memory_mb()
        if (gpu := gpu_peak_mb(self.party.device)) is not None:
            report["gpu_peak_mb"] = gpu
        save_profile(site)
        return self._answer(received.request, {}, report)

    def _end_step(self, received: ReceivedRequest) -> dict:
        """The step's work is done: the next batch's volumes load on a background thread while the server works,
        and the site's own report of this step is returned: the training step it answers (the server's, as sent),
        its CPU seconds and the seconds it was busy (the server's benchmark figures)."""
        self.images.prefetch(received.prefetch)
        report = {k: v for k, v in received.request.info.items() if k in ("train_step", "train_steps")}
        report["cpu_seconds"] = cpu_seconds()
        # Seconds from the executor's receipt of the task (after the site's filters) to here; the reply's encoding
        # comes after. The server tells what a step spends at the site from what it spends waiting on the wire.
        report["busy_seconds"] = round(time.perf_counter() - received.received_at, 4)
        if (parent_seconds := process_cpu_seconds(os.getppid())) is not None:  # the process relaying our messages
            report.update(parent_pid=os.getppid(), parent_cpu_seconds=parent_seconds)
        return report

    def _answer(self, request: TensorMessage, features: dict[int, torch.Tensor], report: dict) -> Shareable:
        reply = TensorMessage(KIND_ACTIVATIONS, request.step, request.patient_ids, features, info=report)
        return reply.to_shareable(self.wire_dtype, compression=self.config.activation_compression)[0]

    def _warm_up(self, agreed: set[str] | None, fl_ctx: FLContext) -> None:
        """The privacy warm-up on the patients this site answers for (whole volumes, or uniform patches drawn
        as the server draws its training patches); nothing is sent."""
        config = self.config
        batches = warmup_batches(agreed if agreed is not None else self.images.patient_ids, config.batch_size,
                                 config.privacy_warmup_steps, config.seed)

        def images(k: int, ids: list[str]) -> np.ndarray:
            if config.patch_shape is None:
                return self.images.batch(ids)
            starts = sample_patch_starts(config.grid_shape, config.patch_shape, config.seed, k, len(ids))
            return PatchBatch(config.patch_shape, starts, None).cut([self.images.volume(pid) for pid in ids],
                                                                    mode="bilinear")

        steps = self.party.warm_up(images(k, ids) for k, ids in enumerate(batches))
        self.log_info(fl_ctx, f"privacy warm-up: {steps} local steps before the first release")
        if self.site_telemetry is not None:
            self._log_privacy_terms(0)

    def _log_privacy_terms(self, train_step: int) -> None:
        adversary = self.party.adversary
        for tag, value in (("site/nopeek_loss", self.party.last_nopeek_loss),
                           ("site/adversarial_loss", self.party.last_adversarial_loss),
                           ("site/adversary_reconstruction_mse",
                            None if adversary is None else adversary.last_reconstruction_loss)):
            if value is not None:
                self.site_telemetry.scalar(tag, value, train_step)

    def _inputs_of(self, task_name: str, request: TensorMessage, site: str) -> Callable[[], np.ndarray]:
        """The checked request for inputs, as a function that reads them: whole volumes ``(B, 1, *grid)``; with
        patch training the server's patches of a training batch (cut, augmented as the server says, then by the
        site's own intensity augmentation) or the windows of one patient (``info["windows"]``, for validation and
        inference: ``(windows, 1, *patch)``)."""
        config, ids = self.config, request.patient_ids
        if config.patch_shape is None or not ids:
            return lambda: self.images.batch(ids)
        if task_name == TASK_TRAIN:
            patches = PatchBatch.from_message(request.info.get("patches"), config, len(ids), site=site)
            train_step = request.info.get("train_step")
            if not is_integer(train_step):
                raise ProtocolError(f"must be an integer, got {str(train_step)[:60]}", site=site,
                                    field="info.train_step")

            def training_patches() -> np.ndarray:
                cut = patches.cut([self.images.volume(pid) for pid in ids], mode="bilinear")
                if not config.augment:
                    return cut
                index = self.run_config["site_index"]
                return np.stack([intensity_augment(patch, intensity_seed(config.seed, index, train_step, k))
                                 for k, patch in enumerate(cut)]).astype(np.float32, copy=False)
            return training_patches
        if len(ids) != 1:
            raise ProtocolError(f"windows are asked for one patient at a time, got {len(ids)}", site=site,
                                field="patient_ids")
        windows = request.info.get("windows")
        if not isinstance(windows, list) or not 1 <= len(windows) <= config.sw_batch_size:
            raise ProtocolError(f"must be a list of 1 to {config.sw_batch_size} window corners", site=site,
                                field="info.windows")
        starts = check_patch_starts(windows, config.grid_shape, config.patch_shape, site=site, field="info.windows")
        return lambda: np.stack([cut_patch(self.images.volume(ids[0]), start, config.patch_shape)
                                 for start in starts]).astype(np.float32, copy=False)

    def _check_order(self, task_name: str, request: TensorMessage, fl_ctx: FLContext, site: str) -> None:
        """The message fits the exchange so far: a new step, the gradient of the pending activations, no new
        batch or checkpoint while activations still await their gradient, a well-formed checkpoint request."""
        if request.step <= self.last_step:
            raise ProtocolError(f"step {request.step} is not after the last step {self.last_step} (replayed or "
                                f"out of order)", site=site, field="step")
        if request.tensors and request.tensor_step != self.pending_step:
            raise ProtocolError(f"gradient for step {request.tensor_step}, but the pending activations are "
                                f"from step {self.pending_step}", site=site, field="tensor_step")
        still_pending = self.pending_step is not None and not request.tensors
        if still_pending and task_name == TASK_TRAIN and request.patient_ids:
            raise ProtocolError(f"new training batch while the activations of step {self.pending_step} await their "
                                f"gradient", site=site, field="patient_ids")
        if "checkpoint" in request.info:
            train_step = request.info["checkpoint"]
            if not is_integer(train_step) or train_step < 1:
                raise ProtocolError(f"checkpoint step must be a positive integer, got {train_step!r}", site=site,
                                    field="checkpoint")
            self._checkpoint_folder(Path(fl_ctx.get_engine().get_workspace().get_root_dir()), site)
            if still_pending:
                raise ProtocolError("checkpoint asked for while activations await their gradient", site=site,
                                    field="checkpoint")

    def _check_patients(self, task_name: str, request: TensorMessage, site: str) -> set[str] | None:
        """Answer only for patients this site holds and, once the server has announced the patients every party
        agreed on (``info["agreed_patients"]``, with the first batch), only for those. Returns the agreed set."""
        agreed, announced = self.agreed, request.info.get("agreed_patients")
        if announced is not None:
            check_patient_ids(announced, site=site, field="agreed_patients", error=ProtocolError)
            if agreed is not None and set(announced) != agreed:
                raise ProtocolError("the agreed patients cannot change during a run", site=site,
                                    field="agreed_patients")
            if missing := sorted(set(announced) - set(self.images.patient_ids)):
                raise ProtocolError(f"{len(missing)} agreed patients are not held here", site=site,
                                    patient=missing[0], field="agreed_patients")
            agreed = set(announced)
        if task_name in (TASK_VALIDATE, TASK_INFER) and not request.patient_ids:
            raise ProtocolError(f"task '{task_name}' names no patient", site=site, field="patient_ids")
        for pid in request.patient_ids:
            if pid not in self.images.patient_ids:
                raise ProtocolError(f"unknown patient (this site has {len(self.images.patient_ids)})", site=site,
                                    patient=pid, field="patient_ids")
            if agreed is not None and pid not in agreed:
                raise ProtocolError("patient outside the agreed intersection", site=site, patient=pid,
                                    field="patient_ids")
        return agreed

    def _check_prefetch(self, request: TensorMessage, agreed: set[str] | None, site: str) -> list[str]:
        """The next batch's patients the server announces (``info["prefetch"]``), under the rule of any request."""
        ids = check_patient_ids(request.info.get("prefetch", []), site=site, field="info.prefetch",
                                error=ProtocolError)
        for pid in ids:
            if pid not in self.images.patient_ids or agreed is not None and pid not in agreed:
                raise ProtocolError("prefetch of a patient this site does not answer for", site=site, patient=pid,
                                    field="info.prefetch")
        return ids

    def _checkpoint_folder(self, root: Path, site: str) -> Path:
        if not self.checkpoint_dir:
            raise ProtocolError("the server asks for a checkpoint, but this site has no checkpoint_dir", site=site,
                                field="checkpoint_dir")
        return inside(root, self.checkpoint_dir, site=site, field="checkpoint_dir")

    def _run_dir(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def _save_checkpoint(self, train_step: int, fl_ctx: FLContext, site: str) -> None:
        """After the gradient of ``train_step`` was applied (checked by ``_check_order``): encoder, optimiser and
        RNG, atomically."""
        folder = self._checkpoint_folder(Path(fl_ctx.get_engine().get_workspace().get_root_dir()), site)
        state = {**self.party.state_dict(), "torch_rng": torch.get_rng_state(), "train_step": train_step,
                 **self.run_config}
        self.log_info(fl_ctx, f"checkpoint saved to {save_site_checkpoint(state, folder, train_step)}")

    def _resume(self, train_step: object, root: Path, site: str, fl_ctx: FLContext) -> None:
        """Load this site's checkpoint of the step the server resumes from; it must be of this very run."""
        if not is_integer(train_step):
            raise ProtocolError(f"resume step must be an integer, got {train_step!r}", site=site, field="resume_step")
        path = site_checkpoint(self._checkpoint_folder(root, site), train_step)
        if not path.is_file():
            raise ProtocolError(f"no checkpoint of step {train_step} at {path}", site=site, field="resume_step")
        state = load_checkpoint(path, site=site, field="resume_step")
        saved = (state["site_index"], state["modality"], state["train"]["network"])
        if saved != (self.run_config["site_index"], self.images.modality, self.run_config["train"]["network"]):
            raise ProtocolError(f"{path} is of another site or network (site {saved[0]}, {saved[1]})", site=site,
                                field="resume_step")
        self.party.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        self.log_info(fl_ctx, f"resumed from {path}")

    def _snapshot(self, request: TensorMessage, fl_ctx: FLContext) -> None:
        """Keep the weights that are about to compute this training step's activations, if asked to."""
        train_step = selected_step(self.snapshot_steps, request.info.get("train_step"), request.info.get("train_steps"))
        if train_step is not None:
            save_atomically({"encoder": self.party.encoder.state_dict(), "step": train_step,
                             "network": self.run_config["train"]["network"], **self.run_config},
                            snapshot_path(self._run_dir(fl_ctx), train_step))

    def _save_encoder(self, fl_ctx: FLContext) -> Path:
        """The encoder never leaves the site: it is saved in the site's own run folder."""
        path = inside(self._run_dir(fl_ctx), self.encoder_file, site=fl_ctx.get_identity_name(), field="encoder_file",
                      where="run folder")
        save_atomically({**self.party.state_dict(), "step": self.last_step, **self.run_config}, path)
        self.log_info(fl_ctx, f"saved encoder to {path}")
        return path

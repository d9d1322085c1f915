"""What the server's two workflows share: NVFlare's life cycle, the set-up of labels, decoder and sites, and the
segmentation of whole patients through the sites' encoders (whole volumes, or sliding windows over patches).

``SplitUNetController`` (training) and ``SplitInferenceController`` (inference) derive from ``SplitWorkflow`` and
compose ``SiteRounds`` for the messages; the learning is ``DecoderParty``'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.signal import Signal

from split_unet.data import DATALIST, SiteLabels
from split_unet.data.readers import Grid
from split_unet.errors import ProtocolError, SplitUNetError
from split_unet.files import write_json
from split_unet.networks import build_decoder
from split_unet.profiling import save_profile, start_profile
from split_unet.training import DecoderParty, TrainConfig, select_device
from split_unet.training.sliding_window import logits_of_windows, sliding_window_logits

from .nvflare_workarounds import apply_task_check_period, short_received_buffer_repr
from .paths import inside
from .rounds import SiteRounds, check_one_grid
from .settings import load_site_settings
from .telemetry import Telemetry


class SplitWorkflow(Controller):
    """The server's workflow skeleton (NVFlare ``Controller``); subclasses implement ``run_workflow``.

    Args:
        sites: client names in encoder order (site k runs encoder k).
        train: ``TrainConfig`` fields (the network, the grid, patches, ...).
        wire_dtype: "float32" (exact) or "float16" (half the bytes) for activations and gradients.
        task_timeout: seconds a site may take to answer one task; then it counts as lost (``on_site_failure``).
        init_timeout: seconds a site may take to answer the first task, in which it opens and checks every volume
            it holds (minutes for a large real data set); a site that does not answer it stops the job. With a
            privacy warm-up (``train.privacy_warmup_steps``) the first request, in which the sites warm up, has it
            too.
        on_site_failure: "stop" ends the job; "continue" goes on without the lost site's modality.
        summary_file: file name of the results written to the server's run folder (relative, no '..').
        num_threads: torch CPU threads for the server (0: torch's default).
        transport: how requests reach the sites: "poll" (NVFlare's task route) or "push" (each request pushed to
            its site at once, ``transport.PushedTasks``); both run every site and server filter.
    """

    def __init__(self, sites: Sequence[str], train: dict | None, wire_dtype: str, task_timeout: int,
                 on_site_failure: str, summary_file: str, num_threads: int, task_check_period: float,
                 init_timeout: int, transport: str = "poll"):
        super().__init__(task_check_period=task_check_period)
        self.sites = list(sites)
        self.config = TrainConfig.from_dict(train or {})
        # As given: NVFlare's Job API writes a component's arguments from its attributes of the same name.
        self.train = dict(train or {})
        self.wire_dtype = wire_dtype
        self.task_timeout = int(task_timeout)
        self.init_timeout = int(init_timeout)
        self.on_site_failure = on_site_failure
        self.summary_file = summary_file
        self.num_threads = num_threads
        self.transport = transport
        self.rounds = SiteRounds(self, self.sites, self.config, wire_dtype, self.task_timeout, on_site_failure,
                                 self.init_timeout, transport)
        self.telemetry = Telemetry(self)
        self.party: DecoderParty | None = None
        self.labels: SiteLabels | None = None
        self.grids: dict[str, Grid] = {}  # per common patient: the source grid every party shares (checked in setup)
        self.run_dir: Path | None = None
        self.summary_path: Path | None = None

    # NVFlare life cycle -------------------------------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        start_profile()
        short_received_buffer_repr()  # NVFlare formats every received payload for a debug line otherwise
        apply_task_check_period(self, self._task_check_period)  # NVFlare 2.9 ignores the Controller's argument
        self.run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        self.telemetry.start(self.run_dir)

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
            self.open_checkpoint(fl_ctx)
            self.summary_path = summary_path
            self.run_workflow(abort_signal, fl_ctx)
            save_profile("server")
        except SplitUNetError as error:
            self._fail(str(error), fl_ctx)
        except Exception as error:  # any failure ends the job with its reason instead of hanging
            self.log_exception(fl_ctx, "split learning failed")
            self._fail(f"{type(error).__name__}: {error}", fl_ctx)
        finally:
            if self.labels is not None:
                self.labels.close()  # the prefetch thread ends with the workflow

    def open_checkpoint(self, fl_ctx: FLContext) -> None:
        """Open the checkpoint the job names, if any; a path outside the server's workspace is refused
        (``ProtocolError``) before anything is written."""

    def run_workflow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        raise NotImplementedError

    # Set-up -------------------------------------------------------------------------------------------------------
    def setup(self, abort_signal: Signal, fl_ctx: FLContext, labels_required: bool = True) -> list[str]:
        """Labels, decoder and sites ready; returns the patients every site (and, if required, the server) holds."""
        config = self.config
        settings = load_site_settings("server", fl_ctx.get_engine().get_workspace().get_root_dir())
        if labels_required or (Path(settings["data_dir"]) / DATALIST).is_file():
            self.labels = SiteLabels(settings["data_dir"], config.size, config.spacing, site="server",
                                     cache_cases=config.cache_cases)
            self.labels.check()
        decoder = build_decoder(config.network, len(self.sites), config.seed)
        self.load_decoder(decoder, fl_ctx)
        self.party = DecoderParty(decoder, config.lr, select_device(config.device), config.micro_batches,
                                  config.decoder_checkpointing, amp=config.amp)
        request = {"train": config.to_dict(), "wire_dtype": self.wire_dtype, "resume_step": self.resume_step(fl_ctx)}
        site_ids = self.rounds.initialize(request, abort_signal, fl_ctx)
        common = set.intersection(*(set(ids) for ids in site_ids.values()))
        if labels_required:
            common &= set(self.labels.patient_ids)
        for site, ids in site_ids.items():
            if missing := set(ids) - common:
                self.log_info(fl_ctx, f"site {site}: {len(missing)} patients not held by every party are ignored")
        if not common:
            raise ProtocolError("no patient is held by every site" + (" and the server" if labels_required else ""),
                                site="server", field="patient_ids")
        for pid in sorted(common):  # one voxel grid per patient at every party, the server's label included
            grids = {site: self.rounds.grids[site][pid] for site in self.sites}
            files = {site: self.rounds.files[site][pid] for site in self.sites}
            if self.labels is not None and pid in self.labels.patient_ids:
                affine, shape = self.labels.geometry(pid)
                grids["server"], files["server"] = (shape, affine), str(self.labels.path(pid))
            self.grids[pid] = check_one_grid(grids, pid, files)
        self.rounds.announce(sorted(common))
        return sorted(common)

    def load_decoder(self, decoder: torch.nn.Module, fl_ctx: FLContext) -> None:
        """Start the decoder from trained weights, if the workflow has any (default: as initialised)."""

    def resume_step(self, fl_ctx: FLContext) -> int | None:
        """The decoder party exists and the sites are not yet asked: restore what the run resumes from, and return
        the training step the sites resume from (None: a fresh start)."""
        return None

    # Segmentation -------------------------------------------------------------------------------------------------
    def segment(self, task_name: str, patient_ids: list[str], abort_signal: Signal, fl_ctx: FLContext) -> torch.Tensor:
        """Logits ``(B, 3, *grid)`` of whole patients: one round for whole volumes; with patch training, every
        patient's overlapping windows (``sw_batch_size`` per round, each site encoding the same windows) blended
        with Gaussian weights as MONAI's ``sliding_window_inference`` blends them; a window that holds no image at any
        site is background, not decoded (``logits_of_windows``)."""
        config, present = self.config, self.rounds.present()
        if config.patch_shape is None:
            return self.party.predict(self.rounds.exchange(task_name, patient_ids, abort_signal, fl_ctx,
                                                           spatial=config.grid_shape), present)

        def predict(pid: str, starts: list[tuple[int, int, int]]) -> torch.Tensor:
            features = self.rounds.exchange(task_name, [pid], abort_signal, fl_ctx, batch=len(starts),
                                            info={"windows": [list(start) for start in starts]})
            return logits_of_windows(
                self.rounds.windows_without_image(len(starts)),
                lambda keep: self.party.predict([{level: t[keep] for level, t in f.items()} for f in features],
                                                present),
                config.network.out_channels, config.patch_shape)

        return torch.cat([sliding_window_logits(config.grid_shape, config.patch_shape,
                                                lambda starts, pid=pid: predict(pid, starts),
                                                config.sw_batch_size, config.sw_overlap) for pid in patient_ids])

    # Log and failure ----------------------------------------------------------------------------------------------
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

    def failure_record(self) -> dict:
        """What the summary keeps of a failed run besides its reason."""
        return {"rounds_done": self.rounds.step, "lost_sites": self.rounds.lost}

    def _fail(self, reason: str, fl_ctx: FLContext) -> None:
        """Record why the run ended and stop the job (nothing already saved is touched)."""
        self.log_error(fl_ctx, f"split learning stopped: {reason}")
        if self.summary_path is not None:
            write_json(self.summary_path, {"error": reason, **self.failure_record(), "failed_at": time.time()})
        self.cancel_all_tasks()
        self.system_panic(reason, fl_ctx)

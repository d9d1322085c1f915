"""Every NVFlare job of Split-U-Net, built with NVFlare's Job API (``FedJob``) from typed settings.

``TrainingJob`` (split learning, also the benchmark's variants and the leakage evaluation), ``PsiJob`` (patient
alignment) and ``InferenceJob`` (segmenting with a trained model) each become a ``FedJob``: the server's
controller and components ``to_server``, each site's executor ``to`` that site, job filters with their
``FilterType`` and tasks. ``export`` writes the folder ``nvflare job submit -j``, POC and the simulator run
(``"format_version": 2`` configs, one app per participant). The repository's ``jobs/`` is what
``split-unet job export`` writes (a test keeps them equal).

A job names classes by path; the sites build them from their installed ``split_unet`` (the path must be on
their class allow list, ``protocol.settings.CLASS_ALLOW_LIST``) unless the job carries the package
(``with_code``: NVFlare then treats it as BYOC, the submitter needs the ``byoc`` right and the sites' allow
lists are skipped).
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.app_common.psi.file_psi_writer import FilePSIWriter
from nvflare.app_common.psi.psi_executor import PSIExecutor
from nvflare.app_opt.psi.dh_psi.dh_psi_task_handler import DhPSITaskHandler
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from split_unet.data import MODALITIES
from split_unet.defence import DEFENCE, Defence, job_defence
from split_unet.errors import DataError
from split_unet.files import load_json
from split_unet.protocol.controller import SplitUNetController
from split_unet.protocol.rounds import largest_training_tensor
from split_unet.protocol.executor import ModalitySiteExecutor
from split_unet.protocol.inference import SplitInferenceController
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE, SEGMENTATIONS, TENSORBOARD_FOLDER
from split_unet.protocol.psi import PSI_OUTPUT, LabelHolderPSIController, SitePatients
from split_unet.protocol.recorder import LeakageRecorder
from split_unet.protocol.wire import TASK_FINISH, TASK_INFER, TASK_INIT, TASK_TRAIN, TASK_VALIDATE
from split_unet.training import TrainConfig, merge_train_settings

TRAINING_JOB = "split_unet"
NATIVE_JOB = "split_unet_native"
PSI_JOB = "split_unet_psi"
# The native job (``split-unet job export --native``): MSD Task01 or BraTS at their own geometry (240 x 240 x 155
# at 1 mm), trained on 128^3 patches with augmentation and segmented by sliding window, with a network sized for a
# GPU (wider channels, two residual units per level), as nnU-Net and MONAI's BraTS bundles train.
# Counted in steps with nnU-Net's poly decay: 200 epochs of 250 steps (nnU-Net trains 1000 such epochs).
NATIVE_TRAIN = {"size": [240, 240, 155], "spacing": 1.0, "patch_size": 128, "augment": True, "epochs": 200,
                "steps_per_epoch": 250, "lr_schedule": "poly",
                "batch_size": 2, "val_batch_size": 1, "val_interval": 10, "val_fraction": 0.2, "lr": 1e-3,
                "sw_batch_size": 4, "cache_cases": 64,
                "network": {"channels": [32, 64, 128, 256], "strides": [2, 2, 2], "num_res_units": 2}}
PACKAGE = Path(__file__).resolve().parent
# The sites ask for work every 0.2 s instead of NVFlare's 2 s: each training step is one task round. Every ask is a
# message the server answers; at 0.05 s the asks of four sites took CPU from the step itself (POC on 2 cores, means
# of 4 and 3 runs: 0.05 s: 3.36 s and 6.04 CPU s per step; 0.2 s: 2.93 s and 5.13; docs/performance.md).
# A site also sleeps this long after each task it answers: on a GPU, where the server's step is shorter, set it lower.
TASK_REQUEST_INTERVAL = 0.2
# With pushed tasks the asks find nothing: the sites ask every 2 s (POC 1.249-1.287 s per step against 1.337 at 0.2 s,
# 0.05-0.13 CPU s per step less; docs/performance.md). The server's end of the job reaches the sites as a message of
# its own, so a site still stops within one interval.
PUSHED_TASK_REQUEST_INTERVAL = 2.0
# Seconds without a site's heartbeat before the server counts it as gone (NVFlare's default is 60): a site busy
# reading a large batch must not be dropped.
HEART_BEAT_TIMEOUT = 600
TRAINING_TASKS = [TASK_INIT, TASK_TRAIN, TASK_VALIDATE, TASK_FINISH]
# Tasks whose data carries the server's gradients (and validation or finish requests) to the sites.
GRADIENT_TASKS = [TASK_TRAIN, TASK_VALIDATE, TASK_FINISH]
# Controller arguments of a training job that its inference job keeps.
INFERENCE_SHARED_ARGS = ("sites", "train", "wire_dtype", "task_timeout", "init_timeout", "on_site_failure",
                         "num_threads", "transport")
# Tasks whose results carry the sites' activations.
ACTIVATION_TASKS = [TASK_TRAIN, TASK_VALIDATE]


@dataclass
class TrainingJob:
    """The split-learning job; its defaults are the shipped job, defended by ``defence.DEFENCE`` (network and
    training settings here, the server's gradient filters; the sites enforce their part in their default scope).
    ``training_settings`` builds one for other settings and scopes.

    Args:
        sites: client names in encoder order (site k runs encoder k; the job deploys to exactly these).
        train: the training budget and network.
        wire_dtype: dtype of activations and gradients on the wire.
        controller_args: further ``SplitUNetController`` arguments (checkpoints, resume, ``on_site_failure``,
            ``task_timeout``, ``num_threads``).
        executor_args: further ``ModalitySiteExecutor`` arguments (``num_threads``, ``checkpoint_dir``).
        psi_job_id: the sites train on the intersection this PSI job found (empty: every common patient).
        record_steps: leakage evaluation: the server's ``LeakageRecorder`` last in its filter chains, and the
            sites keep encoder snapshots of these training steps (-1: the last). Empty in production.
        site_filters: NVFlare filter configs (``{"path", "args"}``) on the activations the sites send.
        server_filters: NVFlare filter configs on the gradients the server sends.
        scope: the sites' privacy scope the job asks for (``meta.json``; None: the sites' default, defended).
        task_request_interval: seconds a site waits before asking again when the server has no task for it (None:
            ``TASK_REQUEST_INTERVAL`` polled, ``PUSHED_TASK_REQUEST_INTERVAL`` pushed; see ``ask_interval``).
        transport: how the server's requests reach the sites: "poll" (NVFlare's task route: the sites ask for
            work) or "push" (``protocol.transport.PushedTasks``: each request sent to its site at once). Both run
            every site and server filter; the sites' asks go on with ``push`` but carry nothing, so they are rarer.
        with_code: the job carries the ``split_unet`` package (see the module docstring).
        name: the job's name (its folder).
    """

    sites: list[str] = field(default_factory=lambda: list(MODALITIES))
    train: TrainConfig = field(default_factory=lambda: train_config({}))
    wire_dtype: str = "float16"
    controller_args: dict = field(default_factory=dict)
    executor_args: dict = field(default_factory=dict)
    psi_job_id: str = ""
    record_steps: list[int] = field(default_factory=list)
    site_filters: list[dict] = field(default_factory=list)
    server_filters: list[dict] = field(default_factory=lambda: list(DEFENCE.server_filters))
    scope: str | None = None
    task_request_interval: float | None = None
    transport: str = "poll"
    with_code: bool = False
    name: str = TRAINING_JOB


@dataclass
class InferenceJob:
    """Segmenting with a trained model: the training job's networks, its trained weights.

    Args:
        training: the training's job settings (its ``train`` gives the networks; filters and recording are
            not used).
        decoder_path: the trained decoder at the server, relative to its workspace.
        encoder_path: each site's trained encoder, relative to the site's workspace (``{site}``: the site name).
        patients: patients to segment (default: every patient all sites hold).
        choose_postprocessing: choose the post-processing on these (labelled training) patients, see
            ``SplitInferenceController``.
    """

    training: TrainingJob
    decoder_path: str
    encoder_path: str
    patients: list[str] = field(default_factory=list)
    choose_postprocessing: bool = False


@dataclass
class PsiJob:
    """Patient alignment: the patients every site and the label holder hold (DH PSI; no id leaves a party)."""

    sites: list[str] = field(default_factory=lambda: list(MODALITIES))
    task_request_interval: float = TASK_REQUEST_INTERVAL
    with_code: bool = False
    name: str = PSI_JOB


def training_settings(train: dict | None = None, defence: Defence | None = None, **settings) -> TrainingJob:
    """A ``TrainingJob`` whose ``train`` is ``TrainConfig`` with ``train`` overrides (``network`` merged key by
    key, as the command-line options give it), under ``defence`` (default: as its ``scope`` asks,
    ``defence.job_defence``: the shipped defence unless the job asks for the undefended scope); ``settings``
    (e.g. ``server_filters``) win over the defence's."""
    return _defended_job(train or {}, None, defence, settings)


def native_settings(train: dict | None = None, defence: Defence | None = None, **settings) -> TrainingJob:
    """The native job (``NATIVE_TRAIN``) with ``train`` overrides, as ``training_settings``."""
    return _defended_job(train or {}, NATIVE_TRAIN, defence, {"name": NATIVE_JOB, **settings})


def _defended_job(train: dict, base: dict | None, defence: Defence | None, settings: dict) -> TrainingJob:
    defence = defence or job_defence(settings.get("scope"))
    return TrainingJob(train=train_config(train, base, defence),
                       **{"server_filters": list(defence.server_filters), **settings})


def train_config(overrides: dict, base: dict | None = None, defence: Defence = DEFENCE) -> TrainConfig:
    """``TrainConfig()`` with ``defence``'s training settings, then ``base``, then ``overrides`` applied; ``network``
    merged key by key. Unless ``base`` or ``overrides`` name the network's levels, it sends those ``defence``
    lets leave the sites."""
    # Patches centred on tumour where the sites' scope lets the label holder send such corners (measured:
    # docs/performance.md, "What label sampling tells the sites"); a job may still ask for either.
    sampling = {"patch_sampling": "label" if defence.label_sampling else "uniform"}
    values = merge_train_settings(TrainConfig().to_dict(), sampling, defence.site_training, base or {}, overrides)
    named_levels = any("levels" in settings.get("network", {}) for settings in (base or {}, overrides))
    if defence.blocked_levels and not named_levels:
        values["network"]["levels"] = defence.sent_levels(len(values["network"]["channels"]))
    return TrainConfig.from_dict(values)


def build_training(settings: TrainingJob) -> FedJob:
    job = _new_job(settings.name, settings.sites, settings.scope)
    job.to_server({"server": _server_params(ask_interval(settings))})
    job.to_server(PTFileModelPersistor(global_model_file_name=DECODER_FILE), id="persistor")
    job.to_server(TBAnalyticsReceiver(tb_folder=TENSORBOARD_FOLDER, events=["analytix_log_stats"]), id="tb_receiver")
    job.to_server(SplitUNetController(**_controller_args(settings)), id=settings.name)
    for spec in settings.server_filters:
        job.to_server(_filter(spec), filter_type=FilterType.TASK_DATA, tasks=GRADIENT_TASKS)
    if settings.record_steps:
        recorder = LeakageRecorder(max_elements=largest_training_tensor(settings.train),
                                   steps=list(settings.record_steps))
        # Last in both chains, so it keeps what the other filters let through.
        job.to_server(recorder, filter_type=FilterType.TASK_RESULT, tasks=[TASK_TRAIN])
        job.to_server(recorder, filter_type=FilterType.TASK_DATA, tasks=GRADIENT_TASKS)
    executor_args = {"encoder_file": ENCODER_FILE, **settings.executor_args}
    if settings.psi_job_id:
        executor_args["psi_job_id"] = settings.psi_job_id
    if settings.record_steps:
        executor_args["snapshot_steps"] = list(settings.record_steps)
    for site in settings.sites:
        job.to(ModalitySiteExecutor(**executor_args), site, tasks=TRAINING_TASKS)
        for spec in settings.site_filters:
            job.to(_filter(spec), site, filter_type=FilterType.TASK_RESULT, tasks=ACTIVATION_TASKS)
    return job


def build_inference(settings: InferenceJob) -> FedJob:
    training = settings.training
    job = _new_job(f"{training.name}_infer", training.sites, training.scope)
    job.to_server({"server": _server_params(ask_interval(training))})
    # The training's settings the inference workflow shares (not its persistor or checkpoints: the decoder comes
    # from decoder_path).
    shared = {key: value for key, value in _controller_args(training).items() if key in INFERENCE_SHARED_ARGS}
    controller_args = {**shared, "decoder_path": settings.decoder_path, "patients": list(settings.patients),
                       "output_folder": SEGMENTATIONS, "choose_postprocessing": settings.choose_postprocessing}
    job.to_server(SplitInferenceController(**controller_args), id=training.name)
    executor_args = {**training.executor_args, "encoder_path": settings.encoder_path}
    for site in training.sites:
        job.to(ModalitySiteExecutor(**executor_args), site, tasks=[TASK_INIT, TASK_INFER])
    return job


def build_psi(settings: PsiJob) -> FedJob:
    job = _new_job(settings.name, settings.sites, None)
    job.to_server({"server": {"task_request_interval": settings.task_request_interval}})
    job.to_server(LabelHolderPSIController(), id="psi")
    for site in settings.sites:
        job.to(PSIExecutor(psi_algo_id="dh_psi"), site, tasks=["PSI"])
        job.to(DhPSITaskHandler(local_psi_id="local_psi"), site, id="dh_psi")
        job.to(SitePatients(psi_writer_id="psi_writer"), site, id="local_psi")
        job.to(FilePSIWriter(output_path=PSI_OUTPUT), site, id="psi_writer")
    return job


BUILDERS = {TrainingJob: build_training, InferenceJob: build_inference, PsiJob: build_psi}


def export(settings: TrainingJob | InferenceJob | PsiJob, job_root: str | Path) -> Path:
    """Write the job under ``job_root/<job name>`` (replacing an earlier export of it); return that folder."""
    job = BUILDERS[type(settings)](settings)
    # The sites' installed split_unet serves the job's classes; with_code adds the whole package below.
    job.set_app_packages([PACKAGE.name])
    job_root = Path(job_root).resolve()
    job.export_job(str(job_root))
    folder = job_root / job.name
    _sort_filter_tasks(folder)
    with_code = settings.training.with_code if isinstance(settings, InferenceJob) else settings.with_code
    if with_code:
        # The whole package, not only the modules the job names: those import the rest.
        for app in folder.glob("app_*"):
            shutil.copytree(PACKAGE, app / "custom" / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _sort_filter_tasks(folder: Path) -> None:
    """Sort the task names of every filter chain in the job's configs. NVFlare's Job API keeps them in a set, so
    their order changed between processes (string hashing is salted per process) and the same job exported
    differently; NVFlare reads them as a set."""
    for path in folder.glob("app_*/config/config_fed_*.json"):
        app_config = load_json(path)
        for chain in (*app_config.get("task_data_filters", []), *app_config.get("task_result_filters", [])):
            chain["tasks"] = sorted(chain["tasks"])
        path.write_text(json.dumps(app_config, indent=4))


def export_all(job_root: str | Path, training: TrainingJob | None = None, psi: PsiJob | None = None) -> list[Path]:
    """The jobs a federation runs in turn: PSI, then training (``split-unet job export``; the repository's
    ``jobs/`` holds their defaults)."""
    return [export(psi or PsiJob(), job_root), export(training or TrainingJob(), job_root)]


def export_repository_jobs(job_root: str | Path) -> list[Path]:
    """The repository's ``jobs/``: the default PSI and training jobs and the native job."""
    return [*export_all(job_root), export(native_settings(), job_root)]


def job_sites(job_dir: str | Path) -> list[str]:
    """The client sites a job folder deploys to (its ``meta.json``)."""
    meta_path = Path(job_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError("not an NVFlare job folder (no meta.json)", field=str(job_dir))
    deploy_map = load_json(meta_path)["deploy_map"]
    return [site for sites in deploy_map.values() for site in sites if site != "server"]


def _new_job(name: str, sites: list[str], scope: str | None) -> FedJob:
    return FedJob(name=name, min_clients=len(sites), meta_props={"scope": scope} if scope else None)


def ask_interval(settings: TrainingJob) -> float:
    """Seconds a site of this job waits before asking again for work: the job's ``task_request_interval``, else
    the transport's default."""
    if settings.task_request_interval is not None:
        return settings.task_request_interval
    return PUSHED_TASK_REQUEST_INTERVAL if settings.transport == "push" else TASK_REQUEST_INTERVAL


def _server_params(task_request_interval: float) -> dict:
    return {"heart_beat_timeout": HEART_BEAT_TIMEOUT, "task_request_interval": task_request_interval}


def _controller_args(settings: TrainingJob) -> dict:
    return {"sites": list(settings.sites), "train": settings.train.to_dict(), "wire_dtype": settings.wire_dtype,
            "persistor_id": "persistor", "transport": settings.transport, **settings.controller_args}


def _filter(spec: dict):
    """An NVFlare filter config ``{"path": "package.module.Class", "args": {...}}`` as the filter object."""
    try:
        module, _, name = spec["path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec.get("args", {}))
    except (KeyError, ImportError, AttributeError, TypeError, ValueError) as error:
        raise DataError(f"not a usable filter config: {error}", field=str(spec)) from error

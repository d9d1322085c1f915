"""Benchmark: centralized late fusion against split learning in the NVFlare simulator and in POC.

One run trains the same model on the same phantom data with the same batch and number of steps in each
mode, each in processes of its own, and reports per mode: seconds per training step (median and spread,
the first step left out), seconds per epoch, the ratio to centralized, tensor bytes per step and site in
each direction against the float16 size of the levels sent, round trips per step, and the peak memory of
the server and of a site process. Validation and start-up are left out of the step times.

Sites beyond the four MSD modalities (``--sites 8``) are extra synthetic modalities: copies of the four in
order (``flair2`` holds FLAIR's images), which cost exactly what a new modality would.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nvflare.fuel.flare_api.api_spec import JobTimeout

from split_unet.data import DATALIST, MODALITIES, SERVER_SITE, generate_dataset, partition_dataset
from split_unet.defence import UNDEFENDED
from split_unet.errors import SplitUNetError
from split_unet.files import load_json, write_json
from split_unet.jobs import TrainingJob, ask_interval, export, training_settings
from split_unet.launch.allocator import tuned_environment
from split_unet.launch.delayed_link import DelayedLink
from split_unet.launch.poc import PocFederation, run_job
from split_unet.profiling import step_statistics
from split_unet.launch.simulation import run_simulation
from split_unet.site_configs import write_site_configs

MODES = ("centralized", "simulator", "poc")


@dataclass
class BenchConfig:
    """One benchmark point. ``comm`` holds NVFlare communication settings (``comm_config.json`` names, e.g.
    ``streaming_chunk_size``), given to every process as ``NVFLARE_*`` environment variables; ``env`` holds
    other environment variables for every process (e.g. ``MALLOC_ARENA_MAX``)."""

    size: int = 64
    spacing: float | None = None  # the grid's isotropic spacing in mm (None: the phantom's ~2.95 mm voxels at 64)
    patients: int = 24
    sites: int = 4
    batch_size: int = 2
    epochs: int = 2
    channels: tuple[int, ...] = (8, 16, 32, 64)
    wire_dtype: str = "float16"
    activation_compression: str | None = None  # TrainConfig.activation_compression
    micro_batches: int = 1
    decoder_checkpointing: bool = False
    task_request_interval: float | None = None  # TrainingJob.task_request_interval (None: by transport)
    direct_job_connections: bool = True  # POC: see PocFederation
    link_delay_ms: float = 0.0  # POC: the sites reach the server this late each way (launch.delayed_link; relayed)
    seed: int = 0
    device: str | None = None
    job_timeout: float = 600.0  # seconds a POC job may take before its mode counts as failed
    transport: str = "poll"  # how the server's requests reach the sites (TrainingJob.transport)
    controller_args: dict = field(default_factory=dict)  # further SplitUNetController arguments
    comm: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    def train(self) -> dict:
        """The ``train`` settings of every mode: validation only after the last epoch."""
        train = {"epochs": self.epochs, "batch_size": self.batch_size, "size": self.size, "spacing": self.spacing,
                 "seed": self.seed,
                 "val_fraction": 0.25, "val_interval": self.epochs, "micro_batches": self.micro_batches,
                 "decoder_checkpointing": self.decoder_checkpointing,
                 "activation_compression": self.activation_compression,
                 "network": {"channels": list(self.channels), "strides": [2] * (len(self.channels) - 1)}}
        return {**train, "device": self.device} if self.device else train

    def float16_bytes(self) -> int:
        """Float16 bytes of the levels one site sends for one batch (the floor for either direction)."""
        return sum(self.batch_size * channels * (self.size // 2 ** level) ** 3 * 2
                   for level, channels in enumerate(self.channels))


def site_names(count: int) -> list[str]:
    """The MSD modalities first, then extra synthetic ones: ``flair2``, ``t1w2``, ... (copies, see above)."""
    return [MODALITIES[k % len(MODALITIES)] + (str(k // len(MODALITIES) + 1) if k >= len(MODALITIES) else "")
            for k in range(count)]


def prepare_data(root: str | Path, config: BenchConfig, progress: Callable[[str], None] = print) -> tuple[Path, Path]:
    """The phantom data set of a configuration and its site folders (made once, then reused).

    Returns ``(msd_dir, sites_dir)``.
    """
    base = Path(root).resolve() / f"phantom{config.size}_{config.patients}p_seed{config.seed}"
    msd, sites_dir = base / "msd", base / "sites"
    if not (msd / "dataset.json").is_file():
        progress(f"generating {config.patients} phantoms of {config.size}^3 in {msd}")
        generate_dataset(msd, config.patients, config.size, config.seed, progress=False)
    if not (sites_dir / SERVER_SITE / DATALIST).is_file():
        partition_dataset(msd, sites_dir, seed=config.seed)
    for name in site_names(config.sites)[len(MODALITIES):]:
        add_copied_site(sites_dir, name, source=name.rstrip("0123456789"))
    return msd, sites_dir


def add_copied_site(sites_dir: Path, name: str, source: str) -> Path:
    """A site folder whose datalist points at another site's images (an extra synthetic modality)."""
    datalist = json.loads((sites_dir / source / DATALIST).read_text())
    datalist["site"] = name
    datalist["patients"] = {pid: f"../{source}/{path}" for pid, path in datalist["patients"].items()}
    folder = sites_dir / name
    folder.mkdir(exist_ok=True)
    (folder / DATALIST).write_text(json.dumps(datalist, indent=2))
    return folder


def training_job(config: BenchConfig, sites: Sequence[str]) -> TrainingJob:
    """The training job of a configuration: these sites, its budget, its polling interval; undefended, as its sites
    have no privacy policy: the benchmark measures the protocol itself."""
    return training_settings(config.train(), UNDEFENDED, sites=list(sites), wire_dtype=config.wire_dtype,
                             task_request_interval=config.task_request_interval, transport=config.transport,
                             controller_args=dict(config.controller_args),
                             executor_args={"num_threads": site_threads(config.sites)})


@contextlib.contextmanager
def process_environment(config: BenchConfig) -> Iterator[None]:
    """``config.env`` and ``config.comm`` for the processes started meanwhile (NVFlare reads every
    ``comm_config.json`` setting from ``NVFLARE_<NAME>`` too)."""
    names = {**{f"NVFLARE_{key.upper()}": str(value) for key, value in config.comm.items()},
             **{key: str(value) for key, value in config.env.items()}}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def site_threads(sites: int) -> int:
    """Torch threads per site process: the cores shared among the sites, as ``run_simulation`` does."""
    return max(1, (os.cpu_count() or 1) // sites)


def run_centralized(msd: Path, workspace: Path, config: BenchConfig) -> dict:
    """Late fusion in a process of its own (so its peak memory is its own)."""
    train = config.train()
    command = [sys.executable, "-m", "split_unet.cli", "centralized", "--data", str(msd), "--out", str(workspace),
               "--mode", "late", "--encoders", str(config.sites), "--epochs", str(train["epochs"]),
               "--batch-size", str(train["batch_size"]), "--size", str(train["size"]), "--seed", str(train["seed"]),
               "--val-fraction", str(train["val_fraction"]), "--val-interval", str(train["val_interval"]),
               "--channels", ",".join(map(str, config.channels))]
    if config.device:
        command += ["--device", config.device]
    if config.spacing:
        command += ["--spacing", str(config.spacing)]
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / "centralized.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, env=tuned_environment(os.environ))
    return load_json(workspace / "summary.json")


def run_in_simulator(sites_dir: Path, workspace: Path, job: TrainingJob, site_configs: Path) -> dict:
    return run_simulation(sites_dir, workspace, job, site_configs=site_configs, progress=None)


def run_in_poc(sites_dir: Path, workspace: Path, job: TrainingJob, site_configs: Path, config: BenchConfig,
               progress: Callable[[str], None]) -> dict:
    """Prepare and start a POC federation of the job's sites on a free loopback port, train, download, stop."""
    workspace.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # a free port on loopback for this federation's server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    federation = PocFederation(workspace / "federation", sites_dir, site_configs, job.sites, port=port,
                               direct_job_connections=config.direct_job_connections)
    if config.link_delay_ms and config.direct_job_connections:
        # The sites' job processes would open their own connections to the server's job process, past the link.
        raise ValueError("a delayed link needs the relayed route (direct_job_connections=False)")
    link = DelayedLink(port, config.link_delay_ms) if config.link_delay_ms else contextlib.nullcontext()
    report: dict = {}
    with link, federation:
        federation.prepare()
        if config.link_delay_ms:
            for site in job.sites:  # each site's connection to the server goes through the link
                startup = federation.prod_dir / site / "startup" / "fed_client.json"
                client = load_json(startup)
                client["servers"][0]["service"]["target"] = f"localhost:{link.port}"
                write_json(startup, client)
        federation.start()
        summary = load_json(run_job(federation, "train", export(job, workspace / "job"), "cli", report, progress,
                                       timeout=config.job_timeout) / "summary.json")
    summary["poc_seconds"] = report["seconds"]
    write_json(workspace / "summary.json", summary)
    return summary


def describe(mode: str, summary: dict, config: BenchConfig, steps_per_epoch: int) -> dict:
    """The benchmark figures of one mode's summary."""
    if "error" in summary:
        return {"mode": mode, "error": summary["error"]}
    seconds = summary["timing"]["step_seconds"]
    row = {"mode": mode, "step_seconds": step_statistics(seconds),
           "cpu_seconds_per_step": summary["timing"]["cpu_seconds_per_step"]["total"],
           "epoch_seconds": round(sum(seconds[-steps_per_epoch:]), 2), "wall_seconds": summary["wall_seconds"],
           "dice_mean": summary["dice"]["mean"]}
    if mode == "centralized":
        row["peak_memory_mb"] = {"process": summary["memory_mb"]["process"]}
        row["cpu_seconds"] = summary["cpu_seconds"]["process"]
        return row
    per_site = summary["bytes_per_step"]["per_site"]
    timing = summary["timing"]
    # Where a step's time goes: the decoder, the slowest site's task, and the rest, which is the server's encoding
    # and decoding of the payloads and NVFlare's dispatch, polling and transfers both ways.
    elsewhere = [step - decoder - site for step, decoder, site
                 in zip(seconds, timing["decoder_seconds"], timing["site_seconds"])]
    row.update(decoder_seconds=step_statistics(timing["decoder_seconds"]),
               site_seconds=step_statistics(timing["site_seconds"]),
               outside_decoder_and_sites_seconds=step_statistics(elsewhere),
               round_trips_per_step=timing["round_trips_per_step"],
               bytes_per_step_per_site={direction: max(counts[direction] for counts in per_site.values())
                                        for direction in ("to_server", "to_site")},
               peak_memory_mb={"server": summary["memory_mb"]["server"],
                               "site": max(v or 0 for v in summary["memory_mb"]["sites"].values())},
               cpu_seconds=round(summary["cpu_seconds"]["server"]
                                 + sum(v or 0 for v in summary["cpu_seconds"]["sites"].values()), 2))
    row["bytes_per_step"] = summary["bytes_per_step"]["total"]
    row["cpu_seconds_per_step_by_process"] = summary["timing"]["cpu_seconds_per_step"]
    row["server_resident_mb"] = summary["timing"].get("server_resident_mb")
    row["bytes_vs_float16"] = round(max(row["bytes_per_step_per_site"].values()) / config.float16_bytes(), 3)
    return row


def federation_figures(row: dict, centralized: dict) -> dict:
    """What the federation costs beyond the same arithmetic centralized: CPU seconds per step of all its processes
    (server, sites and, where they report them, the NVFlare processes relaying their messages) minus centralized's,
    and the tensor megabytes per step it moves per such CPU second."""
    extra = round(row["cpu_seconds_per_step"] - centralized["cpu_seconds_per_step"], 4)
    megabytes = row["bytes_per_step"] / 1e6
    return {"federation_cpu_seconds_per_step": extra,
            "mb_per_federation_cpu_second": round(megabytes / extra, 1) if extra > 0 else None}


def bench(out: str | Path, config: BenchConfig, modes: Sequence[str] = MODES, data_root: str | Path | None = None,
          progress: Callable[[str], None] = print) -> dict:
    """Run the modes one after another on this machine; write ``out/bench.json`` and return it."""
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    msd, sites_dir = prepare_data(data_root or out / "data", config, progress)
    sites = site_names(config.sites)
    site_configs = write_site_configs(out / "site_configs", sites, privacy=None)
    job = training_job(config, sites)
    train_patients = config.patients - round(config.patients * 0.25)
    steps_per_epoch = -(-train_patients // config.batch_size)
    result = {"config": {**asdict(config), "channels": list(config.channels),
                         "task_request_interval": ask_interval(job)}, "sites": sites,
              "float16_bytes_per_site": config.float16_bytes(),
              "steps_per_epoch": steps_per_epoch, "cpu_count": os.cpu_count(), "modes": {}}
    with process_environment(config):
        for mode in modes:
            progress(f"[bench] {mode}: {config.epochs} epochs x {steps_per_epoch} steps, {config.size}^3, "
                     f"batch {config.batch_size}, {config.sites} sites")
            started = time.perf_counter()
            workspace = out / mode
            try:
                if mode == "centralized":
                    summary = run_centralized(msd, workspace, config)
                elif mode == "simulator":
                    summary = run_in_simulator(sites_dir, workspace, job, site_configs)
                else:
                    summary = run_in_poc(sites_dir, workspace, job, site_configs, config, progress)
            except (SplitUNetError, JobTimeout) as error:  # a mode that fails is a result too; go on
                summary = {"error": f"{type(error).__name__}: {error}"}
            row = describe(mode, summary, config, steps_per_epoch)
            row["process_seconds"] = round(time.perf_counter() - started, 1)
            result["modes"][mode] = row
            progress(f"[bench] {mode}: " + (row.get("error") or f"{row['step_seconds']['median']:.3f} s/step"))
    if "centralized" in result["modes"] and "step_seconds" in result["modes"]["centralized"]:
        reference = result["modes"]["centralized"]
        for row in result["modes"].values():
            if "step_seconds" in row:
                row["ratio_to_centralized"] = round(row["step_seconds"]["median"]
                                                    / reference["step_seconds"]["median"], 3)
                row["epoch_ratio_to_centralized"] = round(row["epoch_seconds"] / reference["epoch_seconds"], 3)
                if row is not reference:
                    row.update(federation_figures(row, reference))
    write_json(out / "bench.json", result)
    return result


def bench_table(results: dict) -> str:
    """Markdown table of one ``bench.json``."""
    lines = ["| mode | s/step median (p10-p90) | s/epoch | x centralized (step / epoch) | MB/step/site to server "
             "/ to site | x float16 | round trips/step | peak MB server / site | CPU s/step (all processes) | federation CPU "
             "s/step | MB per federation CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, row in results["modes"].items():
        if "error" in row:
            lines.append(f"| {mode} | error: {row['error']} ||||||||||")
            continue
        stats = row["step_seconds"]
        ratio = (f"{row['ratio_to_centralized']:.2f} / {row['epoch_ratio_to_centralized']:.2f}"
                 if "ratio_to_centralized" in row else "-")
        memory = row["peak_memory_mb"]
        if mode == "centralized":
            traffic, overhead, trips, peak = "-", "-", "-", f"{memory['process']:.0f} (one process)"
        else:
            sent = row["bytes_per_step_per_site"]
            traffic = f"{sent['to_server'] / 1e6:.1f} / {sent['to_site'] / 1e6:.1f}"
            overhead, trips = f"{row['bytes_vs_float16']:.2f}", f"{row['round_trips_per_step']:.2f}"
            peak = f"{memory['server']:.0f} / {memory['site']:.0f}"
        lines.append(f"| {mode} | {stats['median']:.3f} ({stats['p10']:.3f}-{stats['p90']:.3f}) | "
                     f"{row['epoch_seconds']:.1f} | {ratio} | {traffic} | {overhead} | {trips} | {peak} | "
                     f"{row['cpu_seconds_per_step']:.2f} | {row.get('federation_cpu_seconds_per_step', '-')} | "
                     f"{row.get('mb_per_federation_cpu_second') or '-'} |")
    for mode, row in results["modes"].items():
        if "site_seconds" in row and row["site_seconds"].get("steps"):
            lines.append(f"\n{mode}, median seconds per step: decoder {row['decoder_seconds']['median']:.3f}, slowest "
                         f"site {row['site_seconds']['median']:.3f}, neither (payload encoding, NVFlare's dispatch, "
                         f"polling and transfers) {row['outside_decoder_and_sites_seconds']['median']:.3f}")
    return "\n".join(lines)

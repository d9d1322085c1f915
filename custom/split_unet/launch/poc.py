"""NVFlare POC mode, scripted without a prompt: a real federation of the label holder and four sites.

``PocFederation`` prepares the POC workspace from ``poc_project()`` (the server is named ``localhost``, so it
listens on 127.0.0.1 only), installs every site's local settings, starts the server and the sites, submits
jobs (``nvflare job submit`` or the FLARE Session API), waits, downloads results and stops everything it
started. ``run_pipeline`` is the whole story: PSI, training on the intersection, split inference.
``split-unet poc`` (``poc/run.sh``) runs it from the command line.

All NVFlare commands run with ``HOME`` and ``NVFLARE_POC_WORKSPACE`` inside the federation's own folder:
``nvflare poc prepare`` writes ``~/.nvflare/config.conf``, which must not touch the user's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import yaml
from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

from split_unet.errors import SplitUNetError
from split_unet.files import load_json, write_json
from split_unet.data import MODALITIES
from split_unet.launch.allocator import tuned_environment
from split_unet.launch.inference import collect_segmentations, inference_job
from split_unet.jobs import PsiJob, TrainingJob, export
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE, SEGMENTATIONS
from split_unet.protocol.settings import ENV_SITES, SETTINGS_FILE, allow_job_classes
from split_unet.site_configs import resolve_site_configs

POC_PORT = 8002
JOB_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")

COMM_CONFIG_FILE = "comm_config.json"
# NVFlare 2.9 sends every message between a site's job process and the server's job process through the server's
# parent process, which relays it (measured: 0.9 CPU s per 89 MB step) unless ad-hoc connections are allowed: then
# the server's job cell opens a listener of its own and the sites' job cells connect to it. Its host is pinned to
# loopback (POC is one machine; a listener must never face the network here). Like NVFlare's internal
# parent-job connections, an ad-hoc connection is plain TCP: for loopback only.
DIRECT_JOB_CONNECTIONS = {
    "allow_adhoc_conns": True,
    "adhoc": {"scheme": "tcp", "resources": {"host": "127.0.0.1", "listen_host": "127.0.0.1"}},
}


def poc_project(sites: Sequence[str] = MODALITIES, port: int = POC_PORT) -> dict:
    """The POC project (``nvflare poc prepare -i``): the label holder as NVFlare server and one client per site.

    The server is named ``localhost``, so it listens on 127.0.0.1 only (``nvflare poc prepare -n N`` would make a
    server that listens on every interface)."""
    return {
        "api_version": 3, "name": "split_unet_poc", "description": "Split-U-Net POC federation on loopback",
        "participants": [
            {"name": "localhost", "type": "server", "org": "coordinator", "fed_learn_port": port},
            *({"name": site, "type": "client", "org": f"hospital_{site}"} for site in sites),
            {"name": "admin@split-unet.org", "type": "admin", "org": "coordinator", "role": "project_admin"},
        ],
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder", "args": {"template_file": "master_template.yml"}},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


class PocError(SplitUNetError):
    """A POC step failed (the message names the step and where its output is)."""


class PocFederation:
    """One POC federation under ``workspace`` (``home/``, ``poc/``, ``logs/``, ``results/``).

    Args:
        workspace: this federation's own folder.
        sites_dir: the partitioned data (``split-unet partition``); replaces ``${SPLIT_UNET_SITES}`` in the
            site settings installed from ``site_configs``.
        site_configs: ``site_configs/`` (``<site>/local/*``; ``server`` is installed at the NVFlare server); default
            the package's (``site_configs.py``).
        sites: the federation's sites.
        port: the server's port (e.g. a free one in tests).
        python: the Python that runs NVFlare and therefore the server and sites (POC puts its folder first on
            their PATH); e.g. an environment without ``split_unet`` to show that jobs carry their code.
        direct_job_connections: the sites' job processes connect to the server's job process directly
            (``DIRECT_JOB_CONNECTIONS`` in every participant's ``local/comm_config.json``); False: NVFlare's
            default, every message relayed by the server's parent process.
    """

    def __init__(self, workspace: str | Path, sites_dir: str | Path, site_configs: str | Path | None = None,
                 sites: Sequence[str] = MODALITIES, port: int | None = None, python: str = sys.executable,
                 direct_job_connections: bool = True):
        self.workspace = Path(workspace).resolve()
        self.sites_dir = Path(sites_dir).resolve()
        self.site_configs = resolve_site_configs(site_configs, self.workspace)
        self.project = poc_project(sites, port or POC_PORT)
        self.python = python
        self.direct_job_connections = direct_job_connections
        self.server = next(p["name"] for p in self.project["participants"] if p["type"] == "server")
        if self.server != "localhost":
            raise PocError(f"the POC server must be named 'localhost' (loopback only), not '{self.server}'")
        self.clients = [p["name"] for p in self.project["participants"] if p["type"] == "client"]
        self.admin = next(p["name"] for p in self.project["participants"] if p["type"] == "admin")
        self.prod_dir = self.workspace / "poc" / self.project["name"] / "prod_00"
        self.env = tuned_environment({**os.environ, "HOME": str(self.workspace / "home"),
                                      "NVFLARE_POC_WORKSPACE": str(self.workspace / "poc"), "PYTHONUNBUFFERED": "1"})
        self._group: int | None = None  # process group of everything `poc start` launched

    # Life cycle ---------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Provision the POC workspace (no prompt) and install every site's local settings."""
        (self.workspace / "home").mkdir(parents=True, exist_ok=True)
        project_file = self.workspace / "project.yml"
        project_file.write_text(yaml.safe_dump(self.project, sort_keys=False))
        self.nvflare("poc", "prepare", "-i", str(project_file), "--force", timeout=120)
        for participant in (self.server, *self.clients):
            self.install_site_settings(participant)

    def install_site_settings(self, participant: str) -> None:
        """``site_configs/<site>/local/*`` into the participant's ``local/``, data folder resolved; the job's
        classes added to its class allow list; the direct job connections (see ``DIRECT_JOB_CONNECTIONS``)."""
        source = self.site_configs / ("server" if participant == self.server else participant) / "local"
        local = self.prod_dir / participant / "local"
        for path in source.iterdir():
            shutil.copy2(path, local / path.name)
        if self.direct_job_connections:
            write_json(local / COMM_CONFIG_FILE, DIRECT_JOB_CONNECTIONS)
        settings_path = local / SETTINGS_FILE
        if settings_path.is_file():
            settings = load_json(settings_path)
            settings["data_dir"] = settings["data_dir"].replace("${%s}" % ENV_SITES, str(self.sites_dir))
            write_json(settings_path, settings)
        allow_job_classes(local)

    def start(self, timeout: float = 180) -> None:
        """Start the server and the sites; return once every site is connected."""
        log = self._log("poc_start")
        with open(log, "w") as out:
            # A session of its own: every process POC launches stays in this group, so stop() can find them.
            process = subprocess.Popen(self._command("poc", "start", "--no-wait"), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._group = process.pid
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PocError(f"`nvflare poc start` not ready after {timeout:.0f} s; see {log}") from None
        if process.returncode != 0:
            raise PocError(f"`nvflare poc start` failed ({process.returncode}); see {log}")
        self.wait_for_sites(timeout=timeout)

    def wait_for_sites(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.session() as session:
            while True:
                connected = {client.name for client in session.get_system_info().client_info}
                if connected >= set(self.clients):
                    return
                if time.monotonic() > deadline:
                    raise PocError(f"sites not connected after {timeout:.0f} s: {sorted(set(self.clients) - connected)}")
                time.sleep(1)

    def stop(self, timeout: float = 60) -> None:
        """``nvflare poc stop``; then end any process of ours that is still there (by our process group).

        A ``poc stop`` that outlasts ``timeout`` (a busy machine) ends in the same kill, without an error of its
        own: stop() runs on the way out of failed runs too, and must not hide their error."""
        if self._group is None:
            return
        try:
            try:
                self.nvflare("poc", "stop", timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                pass  # the process group is killed below
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            if self.running():
                os.killpg(self._group, signal.SIGKILL)
            self._group = None

    def running(self) -> bool:
        """Whether any process we started is alive."""
        if self._group is None:
            return False
        try:
            os.killpg(self._group, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> "PocFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # Jobs ---------------------------------------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator:
        """A FLARE Session API session as the project admin, closed on exit."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        session = new_secure_session(self.admin, str(self.prod_dir / self.admin), timeout=60)
        try:
            yield session
        finally:
            session.close()

    def submit(self, job_dir: str | Path, via: str = "cli") -> str:
        """Submit a job folder with ``nvflare job submit`` (``via="cli"``) or the Session API (``"api"``)."""
        if via == "api":
            with self.session() as session:
                return session.submit_job(str(Path(job_dir).resolve()))
        output = self.nvflare("job", "submit", "-j", str(Path(job_dir).resolve()), timeout=120)
        match = JOB_ID.search(output)
        if match is None:
            raise PocError(f"no job id in the output of `nvflare job submit`: {output[-500:]}")
        return match.group(0)

    def wait(self, job_id: str, timeout: float = 600, progress: Callable[[str], None] | None = None,
             report_every: float = 30.0) -> str:
        """Wait for a job to end; return its final status (``FINISHED:COMPLETED`` when it went well).

        ``progress`` hears the job's status every ``report_every`` seconds; after ``timeout`` seconds a
        PocError says that the job is still running (it is left running: ``nvflare job abort`` ends it)."""
        started = last_report = time.monotonic()

        def report(_session, _job_id, meta, *_) -> bool:
            nonlocal last_report
            if progress and time.monotonic() - last_report >= report_every:
                last_report = time.monotonic()
                progress(f"job {job_id}: {meta.get('status')} after {last_report - started:.0f} s")
            return True

        with self.session() as session:
            code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=1.0,
                                                                 cb=report)
        if code == MonitorReturnCode.TIMEOUT:
            raise PocError(f"job {job_id} did not end within {timeout:.0f} s (last status "
                           f"{(meta or {}).get('status')}); it is still running: wait longer (--job-timeout) or "
                           f"`nvflare job abort {job_id}`")
        return str((meta or {}).get("status"))

    def download(self, job_id: str) -> Path:
        """The job's result (every participant's run folder and logs) under ``results/<job id>``."""
        target = self.workspace / "results"
        target.mkdir(parents=True, exist_ok=True)
        with self.session() as session:
            return Path(session.download_job_result(job_id, str(target)))

    def site_root(self, site: str) -> Path:
        return self.prod_dir / site

    # Helpers ------------------------------------------------------------------------------------------------------
    def _command(self, *args: str) -> list[str]:
        return [self.python, "-m", "nvflare.cli", *args]

    def _log(self, name: str) -> Path:
        (self.workspace / "logs").mkdir(parents=True, exist_ok=True)
        return self.workspace / "logs" / f"{name}.log"

    def nvflare(self, *args: str, timeout: float, check: bool = True) -> str:
        """Run an ``nvflare`` command without a prompt; its output is also kept in ``logs/``."""
        result = subprocess.run(self._command(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        output = result.stdout + result.stderr
        log = self._log("_".join(args[:2]))
        log.write_text(output)
        if check and result.returncode != 0:
            raise PocError(f"`nvflare {' '.join(args)}` failed ({result.returncode}); see {log}")
        return output


def run_job(federation: PocFederation, name: str, job: Path, via: str, report: dict,
            say: Callable[[str], None], timeout: float = 600) -> Path:
    """Submit, wait, download; record the job and the wall time of each step in ``report``.

    Returns the downloaded server run folder (``<result>/workspace``).
    """
    started = time.perf_counter()
    job_id = federation.submit(job, via=via)
    say(f"{name}: job {job_id} submitted ({via})")
    status = federation.wait(job_id, timeout=timeout, progress=say)
    report.setdefault("jobs", {})[name] = {"id": job_id, "status": status}
    _timed(report, name, started, say)
    if "COMPLETED" not in status:
        raise PocError(f"job {name} ({job_id}) ended with status {status}")
    started = time.perf_counter()
    result = federation.download(job_id)
    _timed(report, f"download_{name}", started, say)
    return result / "workspace"


def _timed(report: dict, phase: str, started: float, say: Callable[[str], None]) -> None:
    report.setdefault("seconds", {})[phase] = round(time.perf_counter() - started, 1)
    say(f"{phase}: {report['seconds'][phase]} s")


def infer_in_poc(federation: PocFederation, train_job_id: str, out: Path, with_code: bool = False,
                 patients: Sequence[str] = (), report: dict | None = None,
                 progress: Callable[[str], None] | None = print, job_timeout: float = 600,
                 overrides: dict | None = None, choose_postprocessing: bool = False) -> dict:
    """Segment with the models of a finished POC training job (the federation running); results in ``out``.

    ``overrides``, ``choose_postprocessing``: see ``infer_in_simulator``.
    """
    report = {} if report is None else report
    say = progress or (lambda _: None)
    # The admin downloaded the training result, decoder included, on the server's machine (POC); the encoders
    # never left their sites' run folders of the training job.
    server_run = federation.workspace / "results" / train_job_id / "workspace"
    if not (server_run / "summary.json").is_file():
        server_run = federation.download(train_job_id) / "workspace"
    # A job names files in the server's own workspace only: the admin puts the downloaded decoder there.
    decoder = f"trained/{train_job_id}/{DECODER_FILE}"
    installed = federation.site_root(federation.server) / decoder
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(server_run / "app_server" / DECODER_FILE, installed)
    settings = inference_job(load_json(server_run / "summary.json"), decoder, f"{train_job_id}/{ENCODER_FILE}",
                             patients, overrides, with_code, choose_postprocessing)
    server_run = run_job(federation, "infer", export(settings, out / "jobs"), "api", report, say, job_timeout)
    return collect_segmentations(server_run / SEGMENTATIONS, out, f"no inference.json in {server_run}")


def run_pipeline(federation: PocFederation, out: str | Path, training: TrainingJob | None = None,
                 psi: PsiJob | None = None, progress: Callable[[str], None] | None = print,
                 job_timeout: float = 600) -> dict:
    """Prepare, start, PSI (unless ``psi`` is None), train, infer, download, stop; return (and write to
    ``out/poc.json``) the results.

    The jobs' ``with_code`` makes them carry the ``split_unet`` package (for sites that do not install it);
    ``job_timeout`` bounds each job's wait (seconds).
    Training is submitted with ``nvflare job submit``, PSI and inference through the Session API.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    training = training or TrainingJob()
    report: dict = {"seconds": {}, "jobs": {}}
    say = progress or (lambda _: None)
    try:
        started = time.perf_counter()
        federation.prepare()
        _timed(report, "prepare", started, say)
        started = time.perf_counter()
        federation.start()
        _timed(report, "start", started, say)

        if psi is not None:
            run_job(federation, "psi", export(psi, out / "jobs"), "api", report, say, job_timeout)
            training = replace(training, psi_job_id=report["jobs"]["psi"]["id"])
        job = export(training, out / "jobs")
        summary = load_json(run_job(federation, "train", job, "cli", report, say, job_timeout) / "summary.json")
        write_json(out / "summary.json", summary)
        report["train"] = {k: summary.get(k) for k in ("dice", "hd95", "steps", "wall_seconds", "config", "error")}
        report["infer"] = infer_in_poc(federation, report["jobs"]["train"]["id"], out, training.with_code,
                                       report=report, progress=progress, job_timeout=job_timeout)
    finally:
        started = time.perf_counter()
        federation.stop()
        _timed(report, "stop", started, say)
        write_json(out / "poc.json", report)
    return report

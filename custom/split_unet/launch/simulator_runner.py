"""NVFlare's simulator runner with what the split-learning runs need from it: each party's own ``local/`` files
and persistent folder, and each simulated site started under its own identity, on a port no other simulation on
the machine takes, or the run told at once that it failed to start (see ``OwnIdentityClientRunner``).

Imported only in the simulator's child process (``split_unet.launch.simulation.main``): it imports NVFlare's
simulator, which the launchers do not need.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path

import psutil
from nvflare.apis.fl_constant import RunnerTask
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner, SimulatorRunner

from split_unet.protocol.telemetry import START_FAILED

#: The lock every simulation on this machine holds from choosing a worker's port until the worker answers on it.
WORKER_START_LOCK = Path(tempfile.gettempdir()) / "split_unet_simulator_worker_start.lock"
_POLL_SECONDS = 0.2


class MachineLock:
    """A lock held by one thread of one process on this machine at a time (a thread lock and ``flock``); only the
    thread that holds it releases it, and releasing a lock the thread does not hold does nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._thread_lock = threading.Lock()
        self._held = threading.local()
        self._file = None

    def acquire(self) -> None:
        self._thread_lock.acquire()
        self._file = open(self.path, "a")  # noqa: SIM115 -- open while held
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._held.value = True

    def release(self) -> None:
        if getattr(self._held, "value", False):
            self._held.value = False
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._thread_lock.release()


def _worker(port: int) -> psutil.Process | None:
    """This process's simulator worker told to listen on ``port`` (its command line names it), if it is running."""
    for child in psutil.Process().children():
        try:
            command = child.cmdline()
            if "--port" in command and command[command.index("--port") + 1] == str(port):
                return child if child.status() != psutil.STATUS_ZOMBIE else None
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, IndexError):
            continue
    return None


def _listens(worker: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in worker.net_connections("tcp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


class OwnIdentityClientRunner(SimulatorClientRunner):
    """NVFlare 2.9's client runner, each of its threads with its own copy of the build context.

    Its ``do_one_task`` writes the site it starts into the build context that all its threads share
    (``self.build_ctx["client_name"] = ...``) and then sends that context to the site's worker process. When two
    threads interleave there (a loaded machine), a worker is built under another site's name: measured in CI, the
    worker of site t2w ran as t1w and trained on t1w's images, so a job meant to fail for t2w's missing data
    succeeded. A thread-local context closes the race without changing anything else in the runner.

    Two more defects of its worker start: ``do_one_task`` picks the worker's port by probing for a free one
    (``get_open_ports``), closes it, starts the worker, which listens on it, and connects to ``localhost`` on it.
    Another simulation on the machine can take the port in between: measured, a site's worker died with "Address
    already in use" (or the runner could connect to the other simulation's worker). And ``_create_connection``
    retries for 60 s without looking whether the worker still runs, then raises in the runner's thread, which ends
    that site's thread while the server waits for it for ``init_timeout`` (30 minutes). Here every simulation on the
    machine starts its workers one at a time (``WORKER_START_LOCK``, from the probe until the worker answers), and a
    worker that exits before it answers is reported at once in a ``START_FAILED`` line naming the site and port.
    """

    @property
    def build_ctx(self) -> dict:
        own = self._thread_contexts
        if not hasattr(own, "context"):
            own.context = copy.deepcopy(self._build_ctx)
        return own.context

    @build_ctx.setter
    def build_ctx(self, context: dict) -> None:
        self._build_ctx = context
        self._thread_contexts = threading.local()

    _start_lock = MachineLock(WORKER_START_LOCK)
    _starting = threading.local()  # the site this thread is starting

    def do_one_task(self, client, num_of_threads, gpu, lock, timeout=60.0, task_name=RunnerTask.TASK_EXEC):
        self._starting.site = client.client_name
        self._start_lock.acquire()  # released by _create_connection once the worker answers
        try:
            return super().do_one_task(client, num_of_threads, gpu, lock, timeout=timeout, task_name=task_name)
        finally:
            self._start_lock.release()  # no-op if already released

    def _create_connection(self, open_port, timeout=60.0):
        """Connect to the worker once it listens on its port itself (not whoever else may listen there); fail at
        once, in a ``START_FAILED`` line, if it exits first."""
        site, deadline = getattr(self._starting, "site", "?"), time.monotonic() + timeout
        try:
            while True:
                worker = _worker(open_port)
                if worker is None:
                    reason = "exited before it listened on its port"
                    break
                if _listens(worker, open_port):
                    with contextlib.suppress(OSError):
                        return Client(("localhost", open_port))
                if time.monotonic() > deadline:
                    reason = f"did not accept the simulator's connection within {timeout:g} s"
                    break
                time.sleep(_POLL_SECONDS)
        finally:
            self._start_lock.release()
        message = f"{START_FAILED}: site {site}: its worker (port {open_port}) {reason}"
        self.logger.error(message)
        raise RuntimeError(message)


class PartyLocalRunner(SimulatorRunner):
    """NVFlare's simulator, with each party's own ``local/`` files and persistent folder (see
    ``split_unet.launch.simulation.simulate``), its sites run by ``OwnIdentityClientRunner``.

    NVFlare offers no per-party ``local/`` folder in the simulator; its ``_setup_local_startup`` is where it fills
    one, so the party's own files are added right after.
    """

    def __init__(self, *args, party_local: str | Path, persistent: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.party_local = Path(party_local)
        self.persistent = Path(persistent) if persistent else None

    def _setup_local_startup(self, log_config_file_path, workspace):
        super()._setup_local_startup(log_config_file_path, workspace)
        party = Path(workspace)
        shutil.copytree(self.party_local / party.name, party / "local", dirs_exist_ok=True)
        if self.persistent:
            target = self.persistent / party.name
            target.mkdir(parents=True, exist_ok=True)
            (party / "persistent").symlink_to(target, target_is_directory=True)

    def client_run(self, server_custom_folder, clients, gpu):
        OwnIdentityClientRunner(server_custom_folder, self.args, clients, self.client_config, self.deploy_args,
                                self.build_ctx).run(gpu)

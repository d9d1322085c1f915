"""Helpers shared by the tests: tiny phantom data sets, a small network, a stand-in NVFlare engine for one party,
and process lookups for the federation tests."""

import json
import signal
import socket
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from split_unet.data import generate_dataset, partition_dataset
from split_unet.protocol.executor import ModalitySiteExecutor
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE
from split_unet.protocol.settings import SETTINGS_FILE
from split_unet.protocol.wire import ERROR_HEADER, KIND_INIT, KIND_REQUEST, TASK_INIT, TASK_TRAIN, TensorMessage
from split_unet.training import TrainConfig

TINY_SIZE = 32
TINY_NETWORK = {"channels": [4, 8, 16], "strides": [2, 2]}


def make_dataset(root: Path, patients: int, size: int = TINY_SIZE, seed: int = 0) -> tuple[Path, Path]:
    """(MSD folder, partitioned sites folder) of a phantom data set."""
    msd = generate_dataset(root / "msd", n_patients=patients, size=size, seed=seed, progress=False)
    partition_dataset(msd, root / "sites", progress=False)
    return msd, root / "sites"


class StandInWorkspace:
    """The part of an NVFlare workspace the executor and controller use: a root folder and run folders."""

    def __init__(self, root):
        self.root = root

    def get_root_dir(self):
        return str(self.root)

    def get_run_dir(self, job_id):
        return str(self.root / job_id)


class StandInEngine:
    """The part of an NVFlare engine a party uses outside a federation: its workspace, events to nobody."""

    def __init__(self, root):
        self.workspace = StandInWorkspace(root)

    def get_workspace(self):
        return self.workspace

    def fire_event(self, event_type, fl_ctx):
        """log_error fires an event; nobody listens here."""


def party_context(root: Path, identity: str = "flair") -> FLContext:
    """A real FLContext of one party (a site or the server) in job ``job1``, around a stand-in engine whose
    workspace is ``root``."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, identity, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.ENGINE, StandInEngine(root), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job1", private=False, sticky=False)
    return fl_ctx


def start_site(sites: Path, workspace: Path, config: TrainConfig, site: str = "flair",
               site_index: int = 0) -> tuple[ModalitySiteExecutor, FLContext, Shareable]:
    """(executor, fl_ctx, reply to the init task for ``config``) of ``site``, whose data is ``sites/<site>``, its
    settings in the ``local/`` folder of its own ``workspace``."""
    (workspace / "local").mkdir(parents=True)
    (workspace / "local" / SETTINGS_FILE).write_text(json.dumps({"modality": site, "data_dir": str(sites / site)}))
    fl_ctx = party_context(workspace, identity=site)
    executor = ModalitySiteExecutor()
    request = DXO(KIND_INIT, data={"train": config.to_dict(), "site_index": site_index, "wire_dtype": "float32"})
    return executor, fl_ctx, executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())


def init_site(sites: Path, workspace: Path, config: TrainConfig) -> tuple[ModalitySiteExecutor, FLContext]:
    """(executor, fl_ctx) of the 'flair' site of ``sites``, initialised for ``config`` (``start_site``)."""
    executor, fl_ctx, reply = start_site(sites, workspace, config)
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK, reply.get_header(ERROR_HEADER)
    return executor, fl_ctx


def send_task(executor, fl_ctx, task, step, patient_ids, gradients=None, tensor_step=None, info=None):
    """The executor's reply to a task carrying ``gradients`` (float32 on the wire), ``info`` and the next batch; a
    training task carries its training step (``info.train_step``, from which the site takes its learning rate) as
    the server's does, ``step`` unless ``info`` gives one."""
    info = {"train_step": step, **(info or {})} if task == TASK_TRAIN else info or {}
    message = TensorMessage(KIND_REQUEST, step, patient_ids, gradients or {}, tensor_step=tensor_step, info=info)
    return executor.execute(task, message.to_shareable("float32")[0], fl_ctx, Signal())


def error_of(reply):
    """The error message of a refused task."""
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    return reply.get_header(ERROR_HEADER)


def bare_python(folder: Path) -> str:
    """The python of a new venv in ``folder`` that sees this environment's packages through a plain ``.pth``
    line: they are importable, but the ``.pth`` files inside their folder (the editable ``split_unet`` install)
    are not run, so ``split_unet`` is not (until installed into the venv). No downloads."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(site_packages, "parent_env.pth").write_text("".join(f"{path}\n" for path in ours))
    return str(python)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulator_worker(site: str) -> psutil.Process:
    """The NVFlare simulator's worker process of ``site``: a descendant of this test's process."""
    return next(p for p in psutil.Process().children(recursive=True)
                if "simulator_worker" in " ".join(p.cmdline()) and f"--client {site}" in " ".join(p.cmdline()))


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@contextmanager
def time_limit(seconds: int, what: str):
    """Raise TimeoutError in ``what`` after ``seconds`` (SIGALRM), so a hung federation never hangs CI; the
    caller's own ``finally`` then stops what it started."""
    def expire(*_):
        raise TimeoutError(f"{what} exceeded {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_federated_step_equals(reference, simulator_dir: Path, sites) -> None:
    """The weights every party of a simulator run saved equal ``reference`` (a ``SplitUNet`` after the same optimiser
    step) to 1e-5 wherever a weight's gradient is at least 1e-7, and those are at least 90 % of the weights.

    Adam's first step moves a weight by lr * g / (|g| + eps), eps = 1e-8. A relative rounding error r in g (another
    summation order across processes) changes that by at most lr * r * eps / |g|: for |g| >= 1e-7 = 10 eps and
    r <= 1e-2 that is <= 1e-5, but where |g| is near eps the move can change by up to 2 * lr. So the exact
    comparison is made where |g| >= 1e-7, and they must be most weights, so the check cannot pass on a few."""
    parts = [(reference.encoders[k], torch.load(simulator_dir / site / "simulate_job" / ENCODER_FILE,
                                                weights_only=True)["encoder"], site) for k, site in enumerate(sites)]
    parts.append((reference.decoder, torch.load(next(simulator_dir.joinpath("server").rglob(DECODER_FILE)),
                                                weights_only=True)["model"], "decoder"))
    compared = total = 0
    for module, saved, where in parts:
        for name, parameter in module.named_parameters():
            sensitive = parameter.grad.abs() >= 1e-7
            difference = (torch.as_tensor(saved[name]) - parameter.detach()).abs()
            assert torch.all(difference[sensitive] <= 1e-5), (where, name, difference[sensitive].max())
            compared += int(sensitive.sum())
            total += parameter.numel()
    assert compared >= 0.9 * total, f"only {compared} of {total} weights had a gradient >= 1e-7"


def background_where_empty(network):
    """The network as the sliding window asks it: a window 0 in every channel answered as background
    (``EMPTY_WINDOW_LOGIT``), written independently of ``logits_of_windows`` for MONAI's ``sliding_window_inference``."""
    from split_unet.training.sliding_window import EMPTY_WINDOW_LOGIT

    def predict(windows: torch.Tensor) -> torch.Tensor:
        logits = network(windows)
        logits[~windows.flatten(1).any(1)] = EMPTY_WINDOW_LOGIT
        return logits
    return predict

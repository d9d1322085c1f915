"""Hostile jobs and hostile data (issue 13), without the simulator: each row of the attack table is refused with
an error naming the site and the field; nothing is written outside a workspace, no code runs, no state changes
after a refusal, and a hostile header allocates no more than 100 MB. The simulator row (a hung site, a scope
without ``--privacy``) is in ``test_hostile_jobs_simulator.py``."""

import gzip
import importlib
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE, error_of, party_context, send_task
from nvflare.apis.controller_spec import TaskCompletionStatus
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.private.privacy_manager import PrivacyManager, PrivacyService

from split_unet import cli
from split_unet.data import SiteImages, partition_dataset, readers
from split_unet.data.check import check_sites
from split_unet.errors import DataError, ProtocolError
from split_unet.filters import ActivationClipNoise
from split_unet.jobs import TrainingJob
from split_unet.networks import build_decoder
from split_unet.protocol.controller import SplitUNetController
from split_unet.protocol.rounds import activation_shapes, refuse_blocked_levels
from split_unet.protocol.executor import ModalitySiteExecutor, check_privacy_scope
from split_unet.protocol.inference import SplitInferenceController
from split_unet.protocol.recorder import LeakageRecorder
from split_unet.protocol.settings import CLASS_ALLOW_LIST, SETTINGS_FILE
from split_unet.protocol.wire import (KIND_ACTIVATIONS, KIND_INIT, KIND_REQUEST, KIND_SITE_INFO, TASK_INIT,
                                      TASK_TRAIN, TASK_VALIDATE, TensorMessage)
from split_unet.launch.simulation import _follow, simulation_policy, stop_process_tree
from split_unet.training import TrainConfig

pytestmark = pytest.mark.unit

MB = 2**20
TRAIN = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK)


# Harness: a site or the server with a real FLContext around a stand-in engine and workspace -------------------------
def _site_workspace(root: Path, sites: Path, **settings) -> FLContext:
    (root / "local").mkdir(parents=True, exist_ok=True)
    (root / "local" / SETTINGS_FILE).write_text(json.dumps({"modality": "flair", "data_dir": str(sites / "flair"),
                                                             **settings}))
    return party_context(root)


def _init(executor: ModalitySiteExecutor, fl_ctx: FLContext, **extra):
    request = DXO(KIND_INIT, data={"train": TRAIN.to_dict(), "site_index": 0, "wire_dtype": "float32", **extra})
    return executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())


class CodeInPickle:
    """Unpickling this object calls ``open(marker, "w")``: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_bomb(path: Path, marker: Path, key: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: CodeInPickle(marker)}, path)
    return path


# Row 1: a pickle named as encoder, checkpoint or decoder runs no code ------------------------------------------------
def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(__file__).resolve().parents[1] / "custom" / "split_unet"
    calls = [(path.name, call) for path in package.rglob("*.py")
             for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls and all("weights_only=True" in call for _, call in calls), calls


def test_a_pickle_as_encoder_path_runs_no_code_at_the_site(tiny_data, tmp_path):
    _, sites = tiny_data
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "ws" / "trained" / "encoder.pt", marker, "encoder")
    error = error_of(_init(ModalitySiteExecutor(encoder_path="trained/encoder.pt"), _site_workspace(tmp_path / "ws", sites)))
    assert not marker.exists()
    assert "site 'flair'" in error and "field 'encoder_path'" in error and "Weights only load failed" in error


def test_a_pickle_as_site_checkpoint_runs_no_code_on_resume(tiny_data, tmp_path):
    _, sites = tiny_data
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "ws" / "checkpoints" / "flair" / "step_0000001.pt", marker, "encoder")
    executor = ModalitySiteExecutor(checkpoint_dir="checkpoints/{site}")
    error = error_of(_init(executor, _site_workspace(tmp_path / "ws", sites), resume_step=1))
    assert not marker.exists()
    assert "site 'flair'" in error and "field 'resume_step'" in error


def test_a_pickle_as_decoder_path_runs_no_code_at_the_server(tmp_path):
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "server" / "trained" / "decoder.pt", marker, "model")
    controller = SplitInferenceController(decoder_path="trained/decoder.pt", train=TRAIN.to_dict())
    with pytest.raises(ProtocolError, match="site 'server', field 'decoder_path'.*Weights only load failed"):
        controller.load_decoder(build_decoder(TRAIN.network, 4, 0), party_context(tmp_path / "server", "server"))
    assert not marker.exists()


# Row 2: a path a job names cannot leave the party's workspace --------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("encoder_file", "../../../escaped.pt"), ("encoder_file", "/ABSOLUTE/escaped.pt"),
    ("checkpoint_dir", "../checkpoints"), ("checkpoint_dir", "/ABSOLUTE/checkpoints"),
    ("encoder_path", "../../trained/encoder.pt"), ("psi_job_id", "../.."),
])
def test_a_site_refuses_a_job_path_outside_its_workspace_before_reading_data(tiny_data, tmp_path, field, value):
    _, sites = tiny_data
    value = value.replace("/ABSOLUTE", str(tmp_path / "outside"))
    workspace = tmp_path / "deep" / "ws"
    executor = ModalitySiteExecutor(**{field: value})
    error = error_of(_init(executor, _site_workspace(workspace, sites)))
    assert f"site 'flair', field '{field}'" in error, error
    assert executor.images is None  # refused before any volume was read
    # Whatever the site did, nothing landed outside its workspace.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and workspace not in p.parents) \
        == []


def test_the_server_refuses_job_paths_outside_its_run_folder_and_workspace(tmp_path):
    fl_ctx = party_context(tmp_path / "server", "server")
    controller = SplitUNetController(train=TRAIN.to_dict(), checkpoint_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ProtocolError, match="site 'server', field 'checkpoint_dir'.*absolute paths and '..' are refused"):
        controller._checkpoint_path(fl_ctx)
    with pytest.raises(ProtocolError, match="site 'server', field 'patients'"):
        SplitInferenceController(decoder_path="decoder.pt", patients=["../../ESCAPED"])

    failures = []
    controller = SplitUNetController(train=TRAIN.to_dict(), summary_file="../../escaped.json")
    controller.run_dir = tmp_path / "server" / "job1"
    controller._fail = lambda reason, ctx: failures.append(reason)
    controller.run_workflow = lambda *args: pytest.fail("the workflow ran with an escaping summary_file")
    controller.control_flow(Signal(), fl_ctx)
    assert len(failures) == 1 and "site 'server', field 'summary_file'" in failures[0]
    assert controller.summary_path is None and not list(tmp_path.rglob("escaped.json"))


# Row 3: one patient-id rule wherever ids enter -----------------------------------------------------------------------
def test_the_server_refuses_an_unknown_activation_compression_when_the_job_loads():
    with pytest.raises(ValueError, match="activation_compression must be None or one of"):
        SplitUNetController(train={**TRAIN.to_dict(), "activation_compression": "lz4"})


def test_a_datalist_id_that_escapes_is_refused_and_check_lists_it(tiny_data, tmp_path):
    _, sites = tiny_data
    shutil.copytree(sites / "flair", tmp_path / "sites" / "flair")
    datalist_path = tmp_path / "sites" / "flair" / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    datalist["patients"]["../../../ESCAPED"] = datalist["patients"]["BRATS_001"]
    datalist_path.write_text(json.dumps(datalist))
    with pytest.raises(DataError, match=r"site 'flair', field '.*datalist.json:patients': patient id '../../../ESCAPED'"):
        SiteImages(tmp_path / "sites" / "flair", TINY_SIZE)
    _, problems, _ = check_sites(tmp_path / "sites", TINY_SIZE)
    assert [(p.site, "ESCAPED" in p.message) for p in problems] == [("flair", True)]


def test_partition_refuses_a_case_whose_id_is_not_a_plain_name(tiny_data, tmp_path):
    msd, _ = tiny_data
    # (A name starting with '.' is skipped as hidden, as the macOS '._' files of the real releases are.)
    case = tmp_path / "brats" / "bad$id"
    case.mkdir(parents=True)
    shutil.copyfile(msd / "labelsTr" / "BRATS_001.nii.gz", case / "bad$id_seg.nii.gz")
    with pytest.raises(DataError, match=r"patient id 'bad\$id' is not"):
        partition_dataset(tmp_path / "brats", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _init_reply(info: dict):
    return DXO(KIND_SITE_INFO, data=info).to_shareable()


@pytest.mark.parametrize("patient_ids, shown", [("ABC", "got str"), ([1, 2], "patient id 1 is not"),
                                                (["../../x"], "patient id '../../x'"), (["a", "a"], "repeat")])
def test_the_server_refuses_init_replies_with_bad_patient_ids(patient_ids, shown):
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    controller.rounds.broadcast = lambda *args: {"flair": _init_reply({"patient_ids": patient_ids, "modality": "flair"})}
    with pytest.raises(ProtocolError, match=f"site 'flair', field 'patient_ids'.*{re.escape(shown)}"):
        controller.rounds.initialize({}, Signal(), FLContext())


@pytest.mark.parametrize("geometry, shown", [
    (None, "must map every patient the site holds"), ({}, "must map every patient the site holds"),
    ({"P1": {"shape": [240, 240], "affine": np.eye(4).tolist()}}, "patient 'P1', field 'info.geometry.shape'"),
    ({"P1": {"shape": [240, 240, 155], "affine": np.zeros((4, 4)).tolist()}}, "field 'info.geometry.affine'")])
def test_the_server_refuses_init_replies_without_each_patients_grid(geometry, shown):
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    info = {"patient_ids": ["P1"], "modality": "flair", "geometry": geometry}
    controller.rounds.broadcast = lambda *args: {"flair": _init_reply(info)}
    with pytest.raises(ProtocolError, match=f"site 'flair', .*{re.escape(shown)}"):
        controller.rounds.initialize({}, Signal(), FLContext())


def test_the_init_task_waits_its_own_timeout_and_rounds_theirs():
    """Sites check all their data in the init task: it may take minutes where a round takes seconds, so a short
    ``task_timeout`` (a hung site is found quickly) must not fail a slow but healthy init."""
    controller = SplitUNetController(sites=["flair", "t1w"], train=TRAIN.to_dict(), task_timeout=7, init_timeout=900,
                                     on_site_failure="continue")
    timeouts, target = {}, {}

    def broadcast(task, fl_ctx, targets, min_responses):
        timeouts[task.name], target[id(task)] = task.timeout, targets[0]

    def wait_for_task(task, abort_signal):  # t1w answers, flair does not (NVFlare ends its task at the timeout)
        if target[id(task)] == "t1w":
            task.client_tasks = [SimpleNamespace(result=Shareable())]
        else:
            task.completion_status = TaskCompletionStatus.TIMEOUT

    controller.broadcast, controller.communicator = broadcast, SimpleNamespace(wait_for_task=wait_for_task)
    payloads = {"flair": Shareable(), "t1w": Shareable()}
    with pytest.raises(ProtocolError, match="site 'flair', field 'split_unet_init': no answer within the task "
                                            "timeout of 900 s"):
        controller.rounds.broadcast(TASK_INIT, payloads, Signal(), FLContext())
    assert list(controller.rounds.broadcast(TASK_TRAIN, payloads, Signal(), FLContext())) == ["t1w"]
    assert timeouts == {TASK_INIT: 900, TASK_TRAIN: 7}
    assert "no answer within the task timeout of 7 s" in controller.rounds.lost["flair"]["reason"]
    controller.rounds.broadcast(TASK_TRAIN, {"t1w": Shareable()}, Signal(), FLContext(), start_up=True)
    assert timeouts[TASK_TRAIN] == 900


@pytest.mark.parametrize("warmup_steps, start_up", [(0, [False, False]), (4, [True, False])])
def test_the_round_in_which_the_sites_warm_up_is_a_start_up_round(warmup_steps, start_up):
    """A site takes its privacy warm-up in its first training task, the one that names the agreed patients: with a
    warm-up only that round may take as long as the init task."""
    train = {**TRAIN.to_dict(), "nopeek_weight": 1.0, "privacy_warmup_steps": warmup_steps}
    controller = SplitUNetController(sites=["flair"], train=train, task_timeout=7, init_timeout=900)
    rounds = []
    controller.rounds.broadcast = lambda *args, start_up: rounds.append(start_up) or {}  # flair answers nothing
    controller.rounds.announce(["BRATS_001"])
    for _ in range(2):
        controller.rounds.exchange(TASK_TRAIN, ["BRATS_001"], Signal(), FLContext())
    assert rounds == start_up


def test_a_message_naming_an_escaping_patient_is_refused():
    message = TensorMessage(KIND_REQUEST, 1, ["../../ESCAPED"])
    with pytest.raises(ProtocolError, match="site 'flair', field 'patient_ids': patient id '../../ESCAPED'"):
        TensorMessage.from_shareable(message.to_shareable("float32")[0], KIND_REQUEST, site="flair")


# Row 4: a refused message leaves the site as it was, so the server's correct retry is accepted ----------------------
def _first_step(executor, fl_ctx):
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    weights = [p.detach().clone() for p in executor.party.encoder.parameters()]
    return {level: torch.ones_like(t) for level, t in features.items()}, weights


def _unchanged(executor, weights):
    return all(torch.equal(a, b) for a, b in zip(weights, executor.party.encoder.parameters()))


def test_a_gradient_with_a_bad_checkpoint_flag_changes_nothing_and_the_retry_is_accepted(site):
    executor, fl_ctx = site
    executor.checkpoint_dir = "checkpoints/{site}"
    gradients, weights = _first_step(executor, fl_ctx)
    error = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1, info={"checkpoint": "x"}))
    assert "site 'flair', field 'checkpoint'" in error
    assert _unchanged(executor, weights) and (executor.last_step, executor.pending_step) == (1, 1)
    retry = send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1, info={"checkpoint": 1})
    assert retry.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert not _unchanged(executor, weights) and executor.last_step == 2


def test_a_new_batch_while_activations_await_their_gradient_changes_nothing(site):
    executor, fl_ctx = site
    gradients, weights = _first_step(executor, fl_ctx)
    error = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_002"]))
    assert "site 'flair', field 'patient_ids'" in error and "await their gradient" in error
    assert _unchanged(executor, weights) and (executor.last_step, executor.pending_step) == (1, 1)
    retry = send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_002"], gradients, tensor_step=1)
    assert retry.get_return_code(ReturnCode.OK) == ReturnCode.OK and executor.pending_step == 2


def _topk_message(shape: list[int]):
    """A tiny top-k gradient message whose header declares ``shape``."""
    return DXO(KIND_ACTIVATIONS,
               data={"0": np.ones(1, np.float16).tobytes(), "0:indices": np.zeros(1, np.int32).tobytes()},
               meta={"step": 1, "patient_ids": ["BRATS_001"], "info": {"train_step": 1, "train_steps": 1},
                     "encodings": {"0": {"codec": "topk", "shape": shape, "scale": 1.0}}}).to_shareable()


def test_a_topk_header_of_huge_dimensions_is_a_protocol_error_naming_the_site():
    with pytest.raises(ProtocolError, match=r"site 'flair', field 'split_unet.activations\[0\].shape'"):
        TensorMessage.from_shareable(_topk_message([0, 2**62, 2**62]), KIND_ACTIVATIONS, site="flair")


def test_the_leakage_recorder_applies_the_controller_bound_before_decoding(tmp_path):
    bound = max(math.prod(s) for s in activation_shapes(TRAIN, TRAIN.batch_size).values())
    recorder = LeakageRecorder(max_elements=bound, steps=[1])
    shareable = _topk_message([1, 4, 512, 512, 256])  # 2^28 elements: 1 GiB once decoded
    fl_ctx, peer = party_context(tmp_path / "server", "server"), FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "flair", private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.PEER_CONTEXT, peer, private=True, sticky=False)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"site 'flair', field .*more than the limit of %d" % bound):
            recorder.process(shareable, fl_ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * MB, peak
    assert not (tmp_path / "server").exists()  # nothing recorded


# Row 4 (server): what a site reports about itself is checked ---------------------------------------------------------
def _server_round(info: dict, controller: SplitUNetController | None = None, patient: str = "P1"):
    controller = controller or SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    tensors = {level: torch.zeros(shape) for level, shape in activation_shapes(TRAIN, 1).items()}
    step = controller.rounds.step + 1
    reply = TensorMessage(KIND_ACTIVATIONS, step, [patient], tensors, info=info).to_shareable("float32")[0]
    controller.rounds.broadcast = lambda *args, **kwargs: {"flair": reply}
    controller.rounds.exchange(TASK_VALIDATE, [patient], Signal(), FLContext())
    return controller


def _honest_privacy_info(releases: int = 1) -> tuple[dict, ActivationClipNoise]:
    noise = ActivationClipNoise(clip_norm=1.0, noise_multiplier=0.5, seed=0)
    tensors = {level: torch.zeros(shape) for level, shape in activation_shapes(TRAIN, 1).items()}
    for _ in range(releases):
        message = noise.transform(TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], dict(tensors)), FLContext())
    return message.info, noise


@pytest.mark.parametrize("info, field", [
    ({"peak_memory_mb": "x" * 5_000_000}, "info.peak_memory_mb"),
    ({"cpu_seconds": float("nan")}, "info.cpu_seconds"),
    ({"cpu_seconds": -1.0}, "info.cpu_seconds"),
    ({"dp_epsilon": 0.0, "dp_delta": 1e-5}, "info.dp_noise_multiplier"),
    ({**_honest_privacy_info()[0], "dp_epsilon": 0.0}, "info.dp_epsilon"),
    ({**_honest_privacy_info()[0], "dp_releases": 0, "dp_epsilon": 0.0}, "info.dp_releases"),
])
def test_the_server_refuses_what_a_site_cannot_have_measured(info, field):
    with pytest.raises(ProtocolError, match=f"site 'flair', field '{re.escape(field)}'"):
        _server_round(info)


def test_the_server_keeps_the_epsilon_it_recomputed_from_an_honest_filter():
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    for round_ in (1, 2):
        info, noise = _honest_privacy_info(releases=round_)
        _server_round(info, controller)
    assert controller.rounds.privacy["flair"]["epsilon"] == pytest.approx(noise.epsilon(), rel=1e-12)
    assert controller.rounds.privacy["flair"]["releases_per_patient"] == 2 * len(activation_shapes(TRAIN, 1))


# Row 5: NIfTI headers are checked before any data is read ------------------------------------------------------------
def _nifti_bytes(shape, dtype=np.float32, srows=None, data: bytes = b"") -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    header["qform_code"], header["sform_code"] = 0, 1
    for name, row in zip(("srow_x", "srow_y", "srow_z"), srows if srows is not None else np.eye(4)[:3]):
        header[name] = row
    return header.binaryblock + b"\0" * 4 + data


MEASURE = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    from split_unet.data.readers import ImageRef, load_image
    from split_unet.errors import DataError
    tracemalloc.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_image(ImageRef(Path(sys.argv[1])), int(sys.argv[2]), site="flair", patient="P1")
        error = None
    except DataError as err:
        error = str(err)
    peak = tracemalloc.get_traced_memory()[1]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"error": error, "traced_peak": peak, "rss_growth": grown}))
""")


def _measured_read(path: Path, grid: int) -> dict:
    """Read ``path`` for a ``grid``^3 job in a fresh process (its imports done first): the error, the peak of
    Python/numpy allocations (tracemalloc) and the growth of the peak resident memory (ru_maxrss)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(grid)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _zeros_volume_gz(path: Path, side: int) -> None:
    """A real, valid ``side``^3 uint8 volume of zeros, written in chunks (the test never holds it in memory)."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(_nifti_bytes((side,) * 3, np.uint8))
        chunk = bytes(2**22)
        for _ in range(side**3 // len(chunk)):
            out.write(chunk)


@pytest.mark.parametrize("name, grid, expected", [
    ("claims_1024_cubed.nii.gz", 32, "more than the 16777216 allowed"),
    ("claims_200_cubed.nii", 32, "header declares 32000352 bytes, but the file has 352"),
    ("claims_250_cubed.nii.gz", 32, "more than a"),
    ("real_512_cubed.nii.gz", 32, "has 134217728 voxels, more than the 16777216 allowed"),
])
def test_a_hostile_header_is_refused_before_its_data_is_read(tmp_path, name, grid, expected, record_property):
    path = tmp_path / name
    if name.startswith("claims_1024"):
        path.write_bytes(gzip.compress(_nifti_bytes((1024,) * 3)))
    elif name.startswith("claims_200"):
        path.write_bytes(_nifti_bytes((200,) * 3))
    elif name.startswith("claims_250"):
        path.write_bytes(gzip.compress(_nifti_bytes((250,) * 3)))
    else:
        _zeros_volume_gz(path, 512)
    measured = _measured_read(path, grid)
    record_property("allocation", measured)
    print(name, path.stat().st_size, "bytes:", measured)
    assert measured["error"] is not None and expected in measured["error"], measured
    assert f"site 'flair', patient 'P1', field '{path}'" in measured["error"]
    assert measured["traced_peak"] < 100 * MB and measured["rss_growth"] < 100 * MB, measured


def test_the_bound_admits_real_brain_geometry():
    assert 240 * 240 * 155 <= readers.max_source_voxels(32) < 512**3
    assert readers.max_source_voxels(512) == 8 * 512**3


def _write(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content))


def test_zero_dimension_singular_or_nan_affine_are_data_errors_and_check_lists_them_all(tiny_data, tmp_path,
                                                                                        capsys):
    _, sites = tiny_data
    shutil.copytree(sites / "flair", tmp_path / "sites" / "flair")
    images = tmp_path / "sites" / "flair" / "images"
    volume = bytes(TINY_SIZE**3 * 4)
    _write(images / "BRATS_001.nii.gz", _nifti_bytes((TINY_SIZE, 0, TINY_SIZE)))
    _write(images / "BRATS_002.nii.gz", _nifti_bytes((TINY_SIZE,) * 3, srows=np.diag([1.0, 1.0, 0.0, 1.0])[:3],
                                                     data=volume))
    nan_rows = np.eye(4)[:3].copy()
    nan_rows[1, 1] = np.nan
    _write(images / "BRATS_003.nii.gz", _nifti_bytes((TINY_SIZE,) * 3, srows=nan_rows, data=volume))
    code = cli.main(["check", "--sites", str(tmp_path / "sites"), "--size", str(TINY_SIZE)])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 3, out
    for patient, message in (("BRATS_001", "every dimension must be at least 1"),
                             ("BRATS_002", "affine must be finite and invertible"),
                             ("BRATS_003", "affine must be finite and invertible")):
        line = next(p for p in problems if f"patient '{patient}'" in p)
        assert f"site 'flair', patient '{patient}', field '{images / (patient + '.nii.gz')}'" in line and message in line


def test_a_transform_failure_is_a_data_error_naming_site_patient_and_file(tiny_data, monkeypatch):
    _, sites = tiny_data
    path = sites / "flair" / "images" / "BRATS_001.nii.gz"

    def broken(*args):
        raise RuntimeError("applying transform <monai.transforms.spatial.array.Spacing object>")
    monkeypatch.setattr(readers, "_grid_transform", lambda *args: broken)
    with pytest.raises(DataError, match=f"site 'flair', patient 'BRATS_001', field '{re.escape(str(path))}'"):
        readers.load_image(readers.ImageRef(path), TINY_SIZE, site="flair", patient="BRATS_001")


# Row 6: site policies: scopes, PSI, the class allow list -------------------------------------------------------------
def test_a_named_scope_at_a_site_without_a_policy_is_refused():
    previous = PrivacyService.manager
    PrivacyService.initialize(PrivacyManager(scopes=None, default_scope_name=None, components=None))
    try:
        fl_ctx = FLContext()
        fl_ctx.set_prop(FLContextKey.JOB_META, {"scope": "clinical"}, private=True, sticky=False)
        with pytest.raises(ProtocolError, match="site 'flair', field 'scope'.*no privacy policy"):
            check_privacy_scope(fl_ctx, "flair")
        check_privacy_scope(FLContext(), "flair")  # a job that names no scope runs under the site's default
    finally:
        PrivacyService.manager = previous


def _default_scope_filters(project_root: Path, site: str) -> tuple[list, list]:
    """(task data filters, task result filters) of a shipped site's default scope, built from its privacy.json as
    NVFlare builds them (class path and arguments)."""
    policy = json.loads((project_root / "site_configs" / site / "local" / "privacy.json").read_text())
    scope = next(scope for scope in policy["scopes"] if scope["name"] == policy["default_scope"])

    def build(spec):
        module, _, name = spec["path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec["args"])
    return [build(s) for s in scope["task_data_filters"]], [build(s) for s in scope["task_result_filters"]]


def _through(filters, payload, fl_ctx):
    for filter_ in filters:
        payload = filter_.process(payload, fl_ctx)
    return payload


@pytest.mark.parametrize("site", ["flair", "t1w", "t1gd", "t2w"])
def test_the_shipped_job_passes_the_default_scope_and_a_hostile_job_cannot_weaken_it(project_root, site):
    data_filters, result_filters = _default_scope_filters(project_root, site)
    fl_ctx = party_context(Path("unused"), identity=site)

    def init(train: TrainConfig | dict):
        settings = train.to_dict() if isinstance(train, TrainConfig) else train
        request = DXO(KIND_INIT, data={"train": settings, "site_index": 0, "wire_dtype": "float16"})
        return _through(data_filters, request.to_shareable(), fl_ctx)

    def declared_blocked_levels():
        info = _through(result_filters, DXO(KIND_SITE_INFO, data={"patient_ids": ["P1"]}).to_shareable(), fl_ctx)
        return from_shareable(info).data.get("blocked_levels", [])

    shipped = TrainingJob().train
    assert from_shareable(init(shipped)).data["train"] == shipped.to_dict()  # passes unchanged
    refuse_blocked_levels(site, declared_blocked_levels(), shipped.network.sent_levels)
    # A job that switches the site's training defence off, or leaves it out, is refused at the site, by name.
    # (As settings, not TrainConfigs: the server writes them; a hostile one need not be a valid TrainConfig.)
    for key, value in (("nopeek_weight", 0.0), ("nopeek_weight", float("nan"))):
        with pytest.raises(ProtocolError, match=rf"site '{site}', field 'train.{key}'.*requires {key}"):
            init({**shipped.to_dict(), key: value})
    with pytest.raises(ProtocolError, match=rf"site '{site}', field 'train.nopeek_levels'.*every level it sends"):
        init({**shipped.to_dict(), "nopeek_levels": [3]})  # NoPeek's weight, but not on levels 1 and 2
    omitted = DXO(KIND_INIT, data={"train": {k: v for k, v in shipped.to_dict().items() if k != "nopeek_weight"}})
    with pytest.raises(ProtocolError, match="requires nopeek_weight >= 1"):
        _through(data_filters, omitted.to_shareable(), fl_ctx)
    # A job whose network sends the full-resolution level is refused at start naming the site (the server's check
    # of what the site declared); whatever the server does, the level never leaves the site.
    all_levels = replace(shipped, network=replace(shipped.network, levels=None))
    with pytest.raises(ProtocolError, match=rf"site '{site}'.*blocks levels \[0\]"):
        refuse_blocked_levels(site, declared_blocked_levels(), all_levels.network.sent_levels)
    sent = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], {0: torch.ones(1, 4, 8, 8, 8), 1: torch.ones(1, 8, 4, 4, 4)})
    received = _through(result_filters, sent.to_shareable("float32")[0], fl_ctx)
    assert sorted(TensorMessage.from_shareable(received, KIND_ACTIVATIONS, site=site).tensors) == [1]


def test_the_simulator_applies_the_sites_own_policy_and_refuses_sites_that_differ(project_root, tmp_path):
    clients = ["flair", "t1w", "t1gd", "t2w"]
    policy = simulation_policy(clients, project_root / "site_configs", None)
    assert policy == project_root / "site_configs" / "flair" / "local" / "privacy.json"
    shutil.copytree(project_root / "site_configs", tmp_path / "site_configs")
    (tmp_path / "site_configs" / "t2w" / "local" / "privacy.json").unlink()
    with pytest.raises(DataError, match=r"one privacy policy to every site, but the policies of \['t2w'\] differ"):
        simulation_policy(clients, tmp_path / "site_configs", None)


def test_a_site_policy_can_require_psi(tiny_data, tmp_path):
    _, sites = tiny_data
    error = error_of(_init(ModalitySiteExecutor(), _site_workspace(tmp_path / "ws", sites, require_psi=True)))
    assert "site 'flair', field 'psi_job_id'" in error and "requires a PSI job" in error


def test_the_class_allow_list_names_exact_production_classes():
    import importlib
    for entry in CLASS_ALLOW_LIST:
        module, _, name = entry.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), entry
    assert not any(entry.endswith(".") for entry in CLASS_ALLOW_LIST)  # no package prefix
    assert not any("LeakageRecorder" in entry or "Decomposer" in entry for entry in CLASS_ALLOW_LIST)


# Row 7: simulate returns once the job ended, stopping what it started ------------------------------------------------
HUNG_SIMULATOR = textwrap.dedent("""
    import subprocess, sys, time
    # A client worker in a session of its own, as NVFlare's simulator starts them; it never exits.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(sys.argv[1], "a") as log:
        log.write("2026-01-01 00:00:00 - ServerRunner - INFO - [identity=simulator_server, run=simulate_job] - "
                  "Server runner finished.\\n")
    time.sleep(600)
""")


def test_a_simulator_that_hangs_after_the_job_ended_is_stopped_with_the_processes_it_started(tmp_path):
    log = tmp_path / "simulator.log"
    log.write_text("")
    process = subprocess.Popen([sys.executable, "-c", HUNG_SIMULATOR, str(log)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(process.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = psutil.Process(process.pid).children()[0]
        started = time.monotonic()
        _follow(process, log, tmp_path / "progress.jsonl", None, grace_seconds=2)
        assert time.monotonic() - started < 60  # the 2 s grace, then SIGTERM (10 s before SIGKILL)
        assert process.poll() is not None and not worker.is_running()
        assert "stopped the simulator and the processes it started" in log.read_text()
    finally:
        if process.poll() is None:
            stop_process_tree(process)

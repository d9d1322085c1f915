"""Shared fixtures (tiny phantom data sets, made once per test session) and the test layers.

Layers, chosen with ``-m``: ``poc`` (a real NVFlare federation on loopback, marked per module), ``simulator``
(runs the NVFlare simulator: marked per test, or implied by the shared trained federation) and ``unit``
(everything else: plain PyTorch/numpy pieces, seconds each)."""

import json
from pathlib import Path

import pytest
from helpers import TINY_NETWORK, TINY_SIZE, make_dataset, party_context, time_limit
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from split_unet.protocol.executor import ModalitySiteExecutor
from split_unet.protocol.settings import SETTINGS_FILE
from split_unet.protocol.wire import ERROR_HEADER, KIND_INIT, TASK_INIT
from split_unet.jobs import training_settings
from split_unet.launch.simulation import run_simulation
from split_unet.training import TrainConfig


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(MSD folder, partitioned sites folder) with 8 patients of 32^3."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), patients=8)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def trained_tiny(tiny_data, tmp_path_factory, project_root) -> tuple[Path, dict]:
    """(workspace, summary) of one split-learning run in the simulator on ``tiny_data``: 3 epochs, the
    leakage recorder on at the first and last step. Shared by the tests that need a trained federation."""
    _, sites = tiny_data
    workspace = tmp_path_factory.mktemp("trained") / "ws"
    job = training_settings({"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 3, "val_interval": 3},
                            record_steps=[1, -1])
    summary = run_simulation(sites, workspace, job, site_configs=project_root / "site_configs", progress=None)
    return workspace, summary


@pytest.fixture
def hard_limit(request):
    """End a test after its module's ``HARD_LIMIT_S`` seconds (``helpers.time_limit``)."""
    with time_limit(request.module.HARD_LIMIT_S, request.node.name):
        yield


@pytest.fixture()
def site(tiny_data, tmp_path):
    """(executor, fl_ctx) of the 'flair' site, its settings in its own local/ folder."""
    _, sites = tiny_data
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / SETTINGS_FILE).write_text(json.dumps({"modality": "flair", "data_dir": str(sites / "flair")}))
    fl_ctx = party_context(tmp_path)
    executor = ModalitySiteExecutor()
    config = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK)
    request = DXO(KIND_INIT, data={"train": config.to_dict(), "site_index": 0, "wire_dtype": "float32"})
    reply = executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK, reply.get_header(ERROR_HEADER)
    return executor, fl_ctx


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("poc") or item.get_closest_marker("simulator"):
            continue
        item.add_marker(pytest.mark.simulator if "trained_tiny" in item.fixturenames else pytest.mark.unit)

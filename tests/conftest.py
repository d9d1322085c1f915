"""Shared fixtures (tiny phantom data sets, made once per test session) and the test layers.

Layers, chosen with ``-m``: ``poc`` (a real NVFlare federation on loopback, marked per module), ``simulator``
(runs the NVFlare simulator: marked per test, or implied by the shared trained federation) and ``unit``
(everything else: plain PyTorch/numpy pieces, seconds each).

``scripts/test.sh`` runs the suite in two pytest-xdist workers (``-n 2``): much of an NVFlare run is
waiting (process start-up, task polling, timeouts of the fault tests), which the other worker fills. Each test file
is a group, so its module fixtures stay in one process; the files that share the trained federation form one group
(it is trained once), and so do the POC files (one federation at a time)."""

from pathlib import Path

import pytest
from helpers import TINY_NETWORK, TINY_SIZE, init_site, make_dataset, time_limit

from split_unet.defence import UNDEFENDED_SCOPE
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
                            record_steps=[1, -1], scope=UNDEFENDED_SCOPE)  # a study of the protocol: every level sent
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
    return init_site(tiny_data[1], tmp_path, TrainConfig(size=TINY_SIZE, network=TINY_NETWORK))


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("poc") or item.get_closest_marker("simulator"):
            continue
        item.add_marker(pytest.mark.simulator if "trained_tiny" in item.fixturenames else pytest.mark.unit)


# The files that share the trained federation (it is made once per worker process).
SHARING_THE_FEDERATION = {path.name for path in Path(__file__).parent.glob("test_*.py")
                          if "trained_tiny" in path.read_text()}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with our groups (see the module's docstring). xdist's ``xdist_group`` marker
    cannot do it here: with pytest 9 it no longer changes a test's id, so every test became a group of its own."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            name = Path(file).name
            if name.startswith("test_poc"):
                return "poc"
            return "trained_tiny" if name in SHARING_THE_FEDERATION else file

    return FileGroupScheduling(config, log)

"""NVFlare's simulator runner with what the split-learning runs need from it: each party's own ``local/`` files
and persistent folder, and each simulated site started under its own identity (see ``OwnIdentityClientRunner``).

Imported only in the simulator's child process (``split_unet.launch.simulation.main``): it imports NVFlare's
simulator, which the launchers do not need.
"""

from __future__ import annotations

import copy
import shutil
import threading
from pathlib import Path

from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner, SimulatorRunner


class OwnIdentityClientRunner(SimulatorClientRunner):
    """NVFlare 2.9's client runner, each of its threads with its own copy of the build context.

    Its ``do_one_task`` writes the site it starts into the build context that all its threads share
    (``self.build_ctx["client_name"] = ...``) and then sends that context to the site's worker process. When two
    threads interleave there (a loaded machine), a worker is built under another site's name: measured in CI, the
    worker of site t2w ran as t1w and trained on t1w's images, so a job meant to fail for t2w's missing data
    succeeded. A thread-local context closes the race without changing anything else in the runner.
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

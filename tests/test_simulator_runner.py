"""The simulator runner starts every simulated site under its own name, however its threads interleave."""

import threading
from types import SimpleNamespace

import pytest
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

from split_unet.launch.simulator_runner import OwnIdentityClientRunner

pytestmark = pytest.mark.unit


def names_sent(runner_class) -> dict[str, str]:
    """Two threads do what NVFlare's ``do_one_task`` does (write the site's name into the build context, then send
    the context), interleaved the way a loaded machine can: each writes before either sends."""
    args = SimpleNamespace(workspace="/nonexistent", set=[])
    runner = runner_class("", args, [], {}, SimpleNamespace(), {"client_name": "", "other": 1})
    both_written, sent = threading.Barrier(2), {}

    def start(site: str) -> None:
        runner.build_ctx["client_name"] = site
        both_written.wait()
        sent[site] = dict(runner.build_ctx)["client_name"]

    threads = [threading.Thread(target=start, args=(site,)) for site in ("t1w", "t2w")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


def test_nvflare_runner_sends_one_site_another_sites_name():
    """The race itself, in NVFlare 2.9's runner: if this stops failing, NVFlare fixed it."""
    sent = names_sent(SimulatorClientRunner)
    assert sent["t1w"] == sent["t2w"]


def test_each_thread_sends_its_own_site_name():
    assert names_sent(OwnIdentityClientRunner) == {"t1w": "t1w", "t2w": "t2w"}

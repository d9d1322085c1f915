"""POC's direct job-cell connections: every participant's comm_config.json allows NVFlare's ad-hoc connections and
pins their listener to loopback (no federation started: the files and NVFlare's own reading of them)."""

import pytest
from nvflare.fuel.f3.cellnet.connector_manager import ConnectorManager
from nvflare.fuel.f3.drivers.net_utils import get_tcp_urls

from split_unet.files import load_json
from split_unet.launch.poc import COMM_CONFIG_FILE, PocFederation
from split_unet.site_configs import write_site_configs

pytestmark = pytest.mark.unit


def _installed(tmp_path, **options) -> PocFederation:
    """A federation whose participants' ``local/`` folders exist (as ``poc prepare`` leaves them), settings installed."""
    federation = PocFederation(tmp_path / "federation", tmp_path / "sites", write_site_configs(tmp_path / "configs"),
                               **options)
    for participant in (federation.server, *federation.clients):
        (federation.prod_dir / participant / "local").mkdir(parents=True)
        federation.install_site_settings(participant)
    return federation


def test_every_participant_allows_direct_job_connections_on_loopback_only(tmp_path):
    federation = _installed(tmp_path)
    for participant in (federation.server, *federation.clients):
        config = load_json(federation.prod_dir / participant / "local" / COMM_CONFIG_FILE)
        assert config["allow_adhoc_conns"] is True
        # What NVFlare's connector manager takes from it, and the URLs its TCP driver makes of that.
        adhoc = ConnectorManager._validate_conn_config(config, "adhoc")
        connect_url, listening_url = get_tcp_urls(adhoc["scheme"], adhoc["resources"])
        assert connect_url.startswith("tcp://127.0.0.1:") and listening_url.startswith("tcp://127.0.0.1:"), participant


def test_relayed_federation_keeps_nvflares_default(tmp_path):
    federation = _installed(tmp_path, direct_job_connections=False)
    assert not list(federation.prod_dir.glob(f"*/local/{COMM_CONFIG_FILE}"))


def test_bench_hands_the_connection_choice_and_job_timeout_to_the_federation(tmp_path, monkeypatch):
    from split_unet import cli
    from split_unet.launch import benchmark

    configs = []
    monkeypatch.setattr(benchmark, "bench", lambda out, config, *args, **kwargs: configs.append(config) or {"modes": {}})
    for extra in ([], ["--relayed", "--job-timeout", "1500"]):
        args = cli.build_parser().parse_args(["bench", "--out", str(tmp_path), "--modes", "poc", *extra])
        assert args.func(args) == 0
    assert [(c.direct_job_connections, c.job_timeout) for c in configs] == [(True, 600.0), (False, 1500.0)]


def test_a_poc_stop_that_times_out_kills_the_federation_without_hiding_the_runs_error(tmp_path, monkeypatch):
    import signal
    import subprocess

    from split_unet.launch import poc

    federation = PocFederation(tmp_path / "federation", tmp_path / "sites")
    federation._group = 4242  # as if `poc start` had launched process group 4242
    killed = []

    def slow_stop(*args, **kwargs):
        raise subprocess.TimeoutExpired(cmd="nvflare poc stop", timeout=kwargs["timeout"])

    def killpg(group, sig):
        if sig == 0 and killed:
            raise ProcessLookupError  # gone once killed
        if sig == signal.SIGKILL:
            killed.append(group)

    monkeypatch.setattr(federation, "nvflare", slow_stop)
    monkeypatch.setattr(poc.os, "killpg", killpg)
    with pytest.raises(RuntimeError, match="the run's own error"):
        try:
            raise RuntimeError("the run's own error")
        finally:
            federation.stop(timeout=0.1)
    assert killed == [4242] and federation._group is None

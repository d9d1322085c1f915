"""The pushed transport in a real NVFlare federation on loopback (POC), where each site applies its own privacy
scope in its own process: every site filter runs at the site on every pushed request and answer, the server's filters
at the server, the leakage recorder records, and a site's component pushing a task to another site is refused there.
Bounded: a hard alarm ends the test, and the federation is stopped in every case."""

import json

import pytest
from helpers import TINY_NETWORK, TINY_SIZE, free_port, make_dataset, processes_mentioning
from job_edits import EVERY_FILTER_POLICY, EVERY_SITE_FILTER, add_filter_logs, add_foreign_task_sender, read_log
from site_components.foreign_task import REPORT_FILE

from split_unet.data import MODALITIES as SITES
from split_unet.files import load_json
from split_unet.jobs import export, training_settings
from split_unet.launch.poc import PocFederation
from split_unet.leakage.record import RECORD_FOLDER, load_record
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TASK_TRAIN
from split_unet.site_configs import write_site_configs

pytestmark = pytest.mark.poc
HARD_LIMIT_S = 900  # start ~1 min and the job ~2 min on an idle 2-core machine; generous for a loaded one


def test_push_in_poc_filters_at_every_party_and_refuses_a_foreign_sender(tmp_path, hard_limit):
    sites_dir = make_dataset(tmp_path / "data", patients=8)[1]
    site_configs = write_site_configs(tmp_path / "site_configs", SITES, privacy=EVERY_FILTER_POLICY)
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "val_fraction": 0.25}
    settings = training_settings(train, scope=EVERY_SITE_FILTER["name"], record_steps=[1], transport="push")
    job = export(settings, tmp_path / "jobs")
    add_filter_logs(job)
    add_foreign_task_sender(job, "flair", "t1w")
    federation = PocFederation(tmp_path / "federation", sites_dir, site_configs, port=free_port())
    try:
        federation.prepare()
        federation.start()
        job_id = federation.submit(job)
        status = federation.wait(job_id, timeout=600)
        server_run = federation.download(job_id) / "workspace"
    finally:
        federation.stop()
    assert not federation.running() and processes_mentioning(str(tmp_path / "federation")) == []
    summary = load_json(server_run / "summary.json")
    assert "COMPLETED" in status and "error" not in summary, summary.get("error")

    server = read_log(server_run)
    for site in SITES:
        site_log = read_log(federation.site_root(site) / job_id)
        # In POC the site's scope runs in the site's process: its noise is in the history of every activation the
        # site sent, before it left, and the server's gradient protection in every gradient it received.
        activations = [e for e in site_log if e["kind"] == KIND_ACTIVATIONS and e["tensors"]]
        gradients = [e for e in site_log if e["kind"] == KIND_REQUEST and e["tensors"]]
        assert len(activations) >= summary["steps"] and all("ActivationClipNoise" in e["history"] for e in activations)
        assert gradients and all("GradientProtection" in e["history"] for e in gradients)
        # The server's own chains ran on each of those requests and answers.
        for direction, server_direction in (("in", "out"), ("out", "in")):
            seen = sorted(e["step"] or 0 for e in site_log if e["direction"] == direction and e["task"] == TASK_TRAIN)
            sent = sorted(e["step"] or 0 for e in server
                          if e["direction"] == server_direction and e["peer"] == site and e["task"] == TASK_TRAIN)
            assert seen == sent, (site, direction)
    assert sorted(exchange.site for exchange in load_record(server_run / RECORD_FOLDER)) == sorted(SITES)

    report = json.loads((federation.site_root("flair") / job_id / REPORT_FILE).read_text())
    assert report["answered"] and report["data_kind"] != KIND_ACTIVATIONS and "'flair'" in report["error"], report

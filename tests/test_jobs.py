"""Every job from one module (NVFlare's Job API): the repository's jobs/ and site_configs/ are what the package
writes, each job file name is spelled once, and the settings land where the sites and server read them."""

import json
import re
from pathlib import Path

import pytest

from split_unet.defence import DEFENCE, DEFENDED_SCOPE, STRICT, STRICT_SCOPE, UNDEFENDED_SCOPE
from split_unet.errors import ProtocolError
from split_unet.jobs import (InferenceJob, PsiJob, TrainingJob, export, export_repository_jobs, job_sites,
                             native_settings, training_settings)
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE
from split_unet.protocol.rounds import refuse_blocked_levels
from split_unet.protocol.wire import TASK_INFER, TASK_INIT, TASK_TRAIN
from split_unet.site_configs import write_site_configs
from split_unet.training import merge_train_settings

pytestmark = pytest.mark.unit


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def config(job: Path, app: str) -> dict:
    return json.loads(next((job / app / "config").glob("config_fed_*.json")).read_text())


def test_repository_jobs_are_what_export_writes(project_root, tmp_path):
    export_repository_jobs(tmp_path)
    assert tree(tmp_path) == tree(project_root / "jobs")


def test_repository_site_configs_are_what_the_package_writes(project_root, tmp_path):
    write_site_configs(tmp_path)
    shipped = {name: content for name, content in tree(project_root / "site_configs").items()
               if name != "project.yml"}  # the production project file is documentation, not generated
    assert tree(tmp_path) == shipped


def test_each_job_file_name_is_spelled_once_in_the_package(project_root):
    sources = [p.read_text() for p in (project_root / "custom" / "split_unet").rglob("*.py")]
    for name in (ENCODER_FILE, DECODER_FILE):
        assert sum(len(re.findall(re.escape(f'"{name}"'), text)) for text in sources) == 1, name


def test_the_shipped_job_and_sites_carry_the_one_defence(project_root):
    # The job: the levels the defence lets leave the sites, its training settings, the server's gradient filters.
    for job in (TrainingJob(), training_settings(), training_settings(scope=DEFENDED_SCOPE)):
        assert job.train.network.sent_levels == (1, 2, 3) == tuple(DEFENCE.sent_levels(4))
        assert all(getattr(job.train, key) == value for key, value in DEFENCE.site_training.items())
        assert job.server_filters == list(DEFENCE.server_filters) and DEFENCE.server_filters
    shipped = project_root / "jobs" / "split_unet"
    assert "scope" not in json.loads((shipped / "meta.json").read_text())  # the sites' default scope
    server = config(shipped, "app_server")
    assert server["workflows"][0]["args"]["train"] == TrainingJob().train.to_dict()
    (gradient_filter,) = server["task_data_filters"][0]["filters"]
    assert gradient_filter["path"].endswith("GradientProtection") and gradient_filter["args"]["noise_multiplier"] == 10
    assert native_settings().train.network.sent_levels == (1, 2, 3)
    # Every shipped site enforces the site's part in its default scope; "undefended" is an explicit opt-in.
    for site in ("flair", "t1w", "t1gd", "t2w"):
        policy = json.loads((project_root / "site_configs" / site / "local" / "privacy.json").read_text())
        scopes = {scope["name"]: scope for scope in policy["scopes"]}
        assert policy["default_scope"] == DEFENDED_SCOPE
        assert set(scopes) == {DEFENDED_SCOPE, STRICT_SCOPE, UNDEFENDED_SCOPE}
        defended = scopes[DEFENDED_SCOPE]
        assert {"path": "split_unet.filters.LevelBlocking", "args": {"blocked_levels": [0]}} in \
            defended["task_result_filters"]
        assert defended["task_data_filters"] == [{"path": "split_unet.filters.TrainingRequirements",
                                                  "args": {"minimum": dict(DEFENCE.site_training),
                                                           "allow_label_sampling": False}}]
        assert DEFENCE.site_training["nopeek_weight"] == 1.0
        assert scopes[UNDEFENDED_SCOPE]["task_data_filters"] == scopes[UNDEFENDED_SCOPE]["task_result_filters"] == []
        # The strict opt-in: the same training requirements, every level but the bottleneck blocked.
        assert scopes[STRICT_SCOPE]["task_data_filters"] == defended["task_data_filters"]
        assert scopes[STRICT_SCOPE]["task_result_filters"] == [
            {"path": "split_unet.filters.LevelBlocking", "args": {"blocked_levels": [0, 1, 2]}}]


def test_a_job_for_the_strict_scope_sends_the_bottleneck_alone_and_a_strict_site_refuses_the_default_job():
    strict = training_settings(scope=STRICT_SCOPE)
    assert strict.train.network.sent_levels == (3,) == tuple(STRICT.sent_levels(4))
    assert all(getattr(strict.train, key) == value for key, value in STRICT.site_training.items())
    assert strict.server_filters == list(DEFENCE.server_filters) and strict.scope == STRICT_SCOPE
    # A site whose default scope is strict refuses, at start, a job that sends the shipped defence's levels.
    refuse_blocked_levels("flair", STRICT.blocked_levels, strict.train.network.sent_levels)
    with pytest.raises(ProtocolError, match=r"site 'flair'.*blocks levels \[1, 2\]"):
        refuse_blocked_levels("flair", STRICT.blocked_levels, training_settings().train.network.sent_levels)


def test_a_job_for_the_undefended_scope_is_undefended_and_explicit_settings_win():
    plain = training_settings({"network": {"channels": [4, 8, 16]}}, scope=UNDEFENDED_SCOPE)
    assert plain.train.network.levels is None and plain.train.nopeek_weight == 0 and plain.server_filters == []
    # The defence fills in only what a job leaves open: levels for the network's own depth, unless named.
    assert training_settings({"network": {"channels": [4, 8, 16]}}).train.network.levels == (1, 2)
    asked = training_settings({"network": {"levels": [0, 1, 2, 3]}, "nopeek_weight": 0.0, "privacy_warmup_steps": 0},
                              server_filters=[])
    assert asked.train.network.levels == (0, 1, 2, 3) and asked.train.nopeek_weight == 0 and asked.server_filters == []


def test_training_settings_are_merged_in_order_and_the_network_key_by_key():
    base = {"epochs": 2, "network": {"channels": [4, 8], "fusion": "mean"}}
    merged = merge_train_settings(base, {"network": {"fusion": "concat"}}, {"epochs": 3}, {})
    assert merged == {"epochs": 3, "network": {"channels": [4, 8], "fusion": "concat"}}
    assert base["network"] == {"channels": [4, 8], "fusion": "mean"}  # the layers are left as they were


def test_training_job_settings_land_in_the_configs(tmp_path):
    settings = training_settings({"epochs": 3, "network": {"channels": [4, 8]}}, sites=["flair", "t1w"],
                                 record_steps=[1, -1], scope="clinical", psi_job_id="psi-1",
                                 site_filters=[{"path": "split_unet.filters.ActivationQuantization",
                                                "args": {"codec": "int8", "keep_fraction": 0.5}}],
                                 server_filters=[{"path": "split_unet.filters.GradientProtection",
                                                  "args": {"noise_multiplier": 4.0}}])
    job = export(settings, tmp_path)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["scope"] == "clinical" and job_sites(job) == ["flair", "t1w"] and meta["min_clients"] == 2
    server = config(job, "app_server")
    train = server["workflows"][0]["args"]["train"]
    assert train["epochs"] == 3 and train["network"]["channels"] == [4, 8] and train["network"]["fusion"] == "concat"
    # The gradient filter first, the recorder last: it records what the filters let through.
    (data_chain,) = server["task_data_filters"]
    assert [f["path"].rsplit(".", 1)[1] for f in data_chain["filters"]] == ["GradientProtection", "LeakageRecorder"]
    (result_chain,) = server["task_result_filters"]
    assert result_chain["tasks"] == [TASK_TRAIN] and result_chain["filters"][0]["args"]["steps"] == [1, -1]
    site = config(job, "app_t1w")
    executor = site["executors"][0]["executor"]["args"]
    assert executor["psi_job_id"] == "psi-1" and executor["snapshot_steps"] == [1, -1]
    # The Job API writes the arguments that differ from the class's defaults (int8 is the default codec).
    (site_filter,) = site["task_result_filters"][0]["filters"]
    assert site_filter["path"].endswith("ActivationQuantization") and site_filter["args"] == {"keep_fraction": 0.5}
    assert not (job / "app_t1w" / "custom").exists()


def test_inference_job_has_no_persistor_and_only_inference_tasks(tmp_path):
    training = training_settings({"size": 32, "network": {"channels": [4, 8]}}, sites=["flair", "t1w"],
                                 wire_dtype="float16", with_code=True)
    job = export(InferenceJob(training, "trained/decoder.pt", "run/{site}.pt", ["BRATS_001"]), tmp_path)
    server = config(job, "app_server")
    workflow = server["workflows"][0]
    assert workflow["path"] == "split_unet.protocol.inference.SplitInferenceController"
    args = workflow["args"]
    assert args["decoder_path"] == "trained/decoder.pt" and args["patients"] == ["BRATS_001"]
    # The trained networks: the training's settings, not the controller's defaults.
    assert args["train"] == training.train.to_dict() and args["sites"] == ["flair", "t1w"]
    assert args["wire_dtype"] == "float16"  # the controller's own default is float32
    assert server["components"] == []
    site = config(job, "app_flair")["executors"][0]
    assert site["tasks"] == [TASK_INIT, TASK_INFER] and site["executor"]["args"]["encoder_path"] == "run/{site}.pt"
    # with_code: every app carries the package, without caches.
    for app in ("app_server", "app_flair", "app_t1w"):
        assert (job / app / "custom" / "split_unet" / "jobs.py").is_file()
    assert not list(job.rglob("__pycache__"))


def test_psi_job_deploys_to_its_sites(tmp_path):
    job = export(PsiJob(sites=["flair", "t2w"]), tmp_path)
    assert job_sites(job) == ["flair", "t2w"]
    assert config(job, "app_flair")["executors"][0]["tasks"] == ["PSI"]


def test_job_export_command_writes_the_options_into_the_jobs(tmp_path):
    from split_unet.cli import main

    assert main(["job", "export", "--out", str(tmp_path), "--scope", "clinical", "--levels", "1,2",
                 "--psi-job-id", "psi-7", "--epochs", "3"]) == 0
    job = tmp_path / "split_unet"
    assert json.loads((job / "meta.json").read_text())["scope"] == "clinical"
    train = config(job, "app_server")["workflows"][0]["args"]["train"]
    assert train["epochs"] == 3 and train["network"]["levels"] == [1, 2]
    assert config(job, "app_t2w")["executors"][0]["executor"]["args"]["psi_job_id"] == "psi-7"
    assert job_sites(tmp_path / "split_unet_psi") == ["flair", "t1w", "t1gd", "t2w"]


@pytest.mark.parametrize("transport, asked, expected", [("poll", None, 0.2), ("push", None, 2.0), ("push", 0.5, 0.5)])
def test_sites_of_a_pushed_job_ask_for_work_rarely_unless_the_job_says(tmp_path, transport, asked, expected):
    training = training_settings({"network": {"channels": [4, 8]}}, sites=["flair", "t1w"], transport=transport,
                                 task_request_interval=asked)
    inference = InferenceJob(training, "trained/decoder.pt", "run/{site}.pt")
    for job in (export(training, tmp_path / "train"), export(inference, tmp_path / "infer")):
        assert config(job, "app_server")["server"]["task_request_interval"] == expected

"""Edits of an exported job for the tests: test-only components (``site_components/``) in the apps' ``custom/``
folders, a site privacy scope with every filter the project ships for sites."""

import json
import shutil
from pathlib import Path

from site_components.filter_log import LOG_FILE

from split_unet.protocol.wire import TASK_FINISH, TASK_INIT, TASK_TRAIN, TASK_VALIDATE

COMPONENTS = Path(__file__).parent / "site_components"
FILTER_LOG = {"path": "site_components.filter_log.FilterLog", "args": {}}
TASKS = [TASK_INIT, TASK_TRAIN, TASK_VALIDATE, TASK_FINISH]
# A site scope with every filter the project ships for sites: the training it requires and the hijack detector on
# the way in, level blocking and activation noise on the way out.
EVERY_SITE_FILTER = {
    "name": "every_filter", "properties": {"data": "patient images"},
    "task_data_filters": [
        {"path": "split_unet.filters.TrainingRequirements",
         "args": {"minimum": {"nopeek_weight": 1.0, "privacy_warmup_steps": 96}}},
        {"path": "split_unet.filters.GradientAnomalyDetector", "args": {}}],
    "task_result_filters": [
        {"path": "split_unet.filters.LevelBlocking", "args": {"blocked_levels": [0]}},
        {"path": "split_unet.filters.ActivationClipNoise", "args": {"clip_norm": 250.0, "noise_multiplier": 0.004}}]}
EVERY_FILTER_POLICY = {"scopes": [EVERY_SITE_FILTER], "default_scope": EVERY_SITE_FILTER["name"]}


def with_components(app: Path) -> dict:
    """The app's code gets ``site_components``; returns its config, to edit and ``save``."""
    if not (app / "custom" / COMPONENTS.name).is_dir():
        shutil.copytree(COMPONENTS, app / "custom" / COMPONENTS.name, ignore=shutil.ignore_patterns("__pycache__"))
    return json.loads(config_path(app).read_text())


def config_path(app: Path) -> Path:
    return next((app / "config").glob("config_fed_*.json"))


def save(app: Path, config: dict) -> None:
    config_path(app).write_text(json.dumps(config, indent=2))


def add_filter_logs(job: Path) -> None:
    """The ``FilterLog`` last in every chain of every party: the server's data (out) and result (in) filters and
    each site's data (in) and result (out) filters."""
    for app in job.glob("app_*"):
        config = with_components(app)
        for chain in ("task_data_filters", "task_result_filters"):
            entries = config.setdefault(chain, [])  # NVFlare takes one chain per task: the log ends each
            for entry in entries:
                entry["filters"].append(FILTER_LOG)
            covered = {task for entry in entries for task in entry["tasks"]}
            entries.append({"tasks": [task for task in TASKS if task not in covered], "filters": [FILTER_LOG]})
        save(app, config)


def add_foreign_task_sender(job: Path, sender: str, target: str) -> None:
    """``sender``'s app gets the hostile ``ForeignTaskSender`` aimed at ``target``."""
    app = job / f"app_{sender}"
    config = with_components(app)
    config.setdefault("components", []).append({"id": "foreign_task_sender",
                                                "path": "site_components.foreign_task.ForeignTaskSender",
                                                "args": {"target": target}})
    save(app, config)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]

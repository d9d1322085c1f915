"""Site-local settings: which modality a site holds and where its data lies; and ``job_scope``, which of the sites'
privacy-policy scopes a job asks for.

They follow NVFlare's convention for site-local configuration (like ``privacy.json`` and
``resources.json``): a file in the site's ``local/`` folder, ``split_unet_site.json``, which never
travels with a job. POC and production install it from ``site_configs/<site>/local/``. The simulator
has no per-site ``local/`` folder, so there the file is found through ``$SPLIT_UNET_SITE_CONFIGS``
(a folder laid out like ``site_configs/``). ``data_dir`` may use environment variables, e.g.
``${SPLIT_UNET_SITES}/flair``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from split_unet.errors import DataError

SETTINGS_FILE = "split_unet_site.json"
ENV_SITE_CONFIGS = "SPLIT_UNET_SITE_CONFIGS"
ENV_SITES = "SPLIT_UNET_SITES"

# NVFlare 2.9 builds only component classes a site allows (``class_allow_list`` in its
# ``local/resources.json``), unless the job brings its own code. A site that runs this job allows exactly
# these classes: the workflow, the site executor, PSI, the privacy filters, the decoder persistor and
# TensorBoard; not the leakage recorder (a research tool, ``RESEARCH_CLASSES``) and no decomposer (numpy
# arrays travel natively, so none is registered).
CLASS_ALLOW_LIST = [
    "split_unet.protocol.controller.SplitUNetController",
    "split_unet.protocol.inference.SplitInferenceController",
    "split_unet.protocol.executor.ModalitySiteExecutor",
    "split_unet.protocol.psi.SitePatients",
    "split_unet.protocol.psi.LabelHolderPSIController",
    # The filters by their package name (as site privacy policies name them) and by their module (as the
    # Job API writes a job's filters).
    "split_unet.filters.LevelBlocking",
    "split_unet.filters.ActivationClipNoise",
    "split_unet.filters.ActivationQuantization",
    "split_unet.filters.GradientProtection",
    "split_unet.filters.TrainingRequirements",
    "split_unet.filters.level_blocking.LevelBlocking",
    "split_unet.filters.activation_privacy.ActivationClipNoise",
    "split_unet.filters.quantization.ActivationQuantization",
    "split_unet.filters.gradient_protection.GradientProtection",
    "split_unet.filters.training_requirements.TrainingRequirements",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
]
# Allowed only where a leakage evaluation runs (the simulator adds them when a job uses them).
RESEARCH_CLASSES = ["split_unet.protocol.recorder.LeakageRecorder"]


def settings_candidates(site: str, workspace_root: str | Path | None) -> list[Path]:
    candidates = []
    if workspace_root:
        candidates.append(Path(workspace_root) / "local" / SETTINGS_FILE)
    if os.environ.get(ENV_SITE_CONFIGS):
        candidates.append(Path(os.environ[ENV_SITE_CONFIGS]) / site / "local" / SETTINGS_FILE)
    return candidates


def load_site_settings(site: str, workspace_root: str | Path | None = None) -> dict:
    """The first settings file found, with ``data_dir`` resolved to an absolute path."""
    candidates = settings_candidates(site, workspace_root)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p) for p in candidates) or f"none (set ${ENV_SITE_CONFIGS})"
        raise DataError(f"no site settings found; tried {tried}", site=site, field=SETTINGS_FILE)
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read site settings: {error}", site=site, field=str(path)) from error
    if not isinstance(settings, dict) or not isinstance(settings.get("data_dir"), str):
        raise DataError("settings need a 'data_dir' string", site=site, field=f"{path}:data_dir")
    data_dir = os.path.expanduser(os.path.expandvars(settings["data_dir"]))
    if "$" in data_dir:
        raise DataError(f"data_dir '{settings['data_dir']}' names an unset environment variable", site=site,
                        field=f"{path}:data_dir")
    base = path.parent
    settings["data_dir"] = str((base / data_dir).resolve() if not os.path.isabs(data_dir) else Path(data_dir))
    settings["settings_file"] = str(path)
    return settings


def job_scope(fl_ctx: FLContext) -> str | None:
    """The privacy scope the running job asks for (its ``meta.json`` ``scope``), None for the sites' default: which
    of a site's ``local/privacy.json`` scopes applies (the site checks it), and what the server's summary records."""
    return fl_ctx.get_prop(FLContextKey.JOB_SCOPE_NAME) or (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("scope")


def allow_job_classes(local_dir: str | Path) -> Path:
    """Add ``CLASS_ALLOW_LIST`` to a site's ``local/resources.json``, keeping everything else in it.

    Starts from ``resources.json``, else from the ``resources.json.default`` that provisioning wrote.
    """
    local_dir = Path(local_dir)
    source = next((p for p in (local_dir / "resources.json", local_dir / "resources.json.default") if p.is_file()),
                  None)
    resources = json.loads(source.read_text()) if source else {}
    allowed = resources.setdefault("class_allow_list", [])
    allowed.extend(entry for entry in CLASS_ALLOW_LIST if entry not in allowed)
    path = local_dir / "resources.json"
    path.write_text(json.dumps(resources, indent=2))
    return path

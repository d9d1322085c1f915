"""The sites' and the server's local settings (``<participant>/local/``): written by the package, so every
command finds them wherever it runs. The repository's ``site_configs/`` is what ``write_site_configs`` writes
(a test keeps them equal), beside the production project file ``site_configs/project.yml``.

Each modality site gets ``split_unet_site.json`` (its modality and data folder) and ``privacy.json`` (its
privacy policy: the default scope ``clinical`` enforces the site's part of the shipped defence,
``defence.DEFENCE``, whatever a job asks; ``strict`` that of ``defence.STRICT`` (the bottleneck alone), for a job
that asks for it or a site that makes it its default; the scope ``undefended`` has no filters and is an explicit
opt-in for phantoms and studies only); the server gets its data folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from split_unet.data import MODALITIES, SERVER_SITE
from split_unet.defence import DEFENCE, DEFENDED_SCOPE, STRICT, STRICT_SCOPE, UNDEFENDED, UNDEFENDED_SCOPE
from split_unet.files import write_json
from split_unet.protocol.settings import ENV_SITES, SETTINGS_FILE

PRIVACY_FILE = "privacy.json"
PRIVACY_POLICY = {
    "scopes": [
        DEFENCE.site_scope(DEFENDED_SCOPE, {"data": "patient images", "defence": DEFENCE.name}),
        STRICT.site_scope(STRICT_SCOPE, {"data": "patient images", "defence": STRICT.name}),
        UNDEFENDED.site_scope(UNDEFENDED_SCOPE, {"data": "phantoms and studies only: no patient images"}),
    ],
    "default_scope": DEFENDED_SCOPE,
}


def write_site_configs(folder: str | Path, sites: Sequence[str] = MODALITIES,
                       privacy: dict | None = PRIVACY_POLICY) -> Path:
    """``folder/<site>/local/`` for these sites and the server; ``privacy`` (None: none) at every site. A site
    named after an MSD modality is told to hold it (the site checks its data against it); others (the
    benchmark's copies) are not."""
    folder = Path(folder)
    for site in sites:
        local = folder / site / "local"
        modality = {"modality": site} if site in MODALITIES else {}
        write_json(local / SETTINGS_FILE, {**modality, "data_dir": data_dir(site)})
        if privacy is not None:
            write_json(local / PRIVACY_FILE, privacy)
    write_json(folder / SERVER_SITE / "local" / SETTINGS_FILE, {"data_dir": data_dir(SERVER_SITE)})
    return folder


def data_dir(participant: str) -> str:
    return "${%s}/%s" % (ENV_SITES, participant)


def resolve_site_configs(site_configs: str | Path | None, workspace: str | Path) -> Path:
    """``site_configs`` as an absolute folder; None: the package's, written to ``workspace/site_configs``."""
    if site_configs is None:
        return write_site_configs(Path(workspace).resolve() / "site_configs")
    return Path(site_configs).resolve()

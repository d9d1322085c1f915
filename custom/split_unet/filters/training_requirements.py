"""Training settings a site requires of every job: its privacy policy's check of the run configuration.

A defence that lives in the site's own training (NoPeek's weight, ``train.nopeek_weight``) is configured by the
job, which the server writes: a job could simply switch it off. This filter, in the site's privacy policy,
reads the run configuration the server sends with ``split_unet_init`` and refuses the task when a required
setting is below the site's minimum, before the site reads any data or builds its encoder: the job never
starts at that site (NVFlare answers the server ``TASK_DATA_FILTER_ERROR``; the site's log names the site, the
setting and both values).

It also keeps the label holder's label out of the site where the scope says so: with label sampling the server
centres patches on tumour and every corner it sends tells the site where the tumour is
(``split_unet.leakage.corners``); a scope that refuses label sampling refuses such a job at start.
"""

from __future__ import annotations

from collections.abc import Mapping

from nvflare.apis.dxo import DXO
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from split_unet.errors import ProtocolError
from split_unet.ids import is_number
from split_unet.protocol.wire import KIND_INIT
from split_unet.training import TrainConfig

from .base import receiving_site


class TrainingRequirements(DXOFilter):
    """Site-side ``task_data_filter`` on ``split_unet_init``: refuses a run whose training settings fall short.

    Args:
        minimum: ``{TrainConfig field: least value}``, e.g. ``{"nopeek_weight": 1.0}``; a field the run
            configuration omits counts with ``TrainConfig``'s default.
        allow_label_sampling: False: a patch job whose ``patch_sampling`` is "label" is refused.
    """

    def __init__(self, minimum: Mapping[str, float] | None = None, allow_label_sampling: bool = True):
        minimum = minimum or {}
        super().__init__(supported_data_kinds=[KIND_INIT], data_kinds_to_filter=[KIND_INIT])
        defaults = TrainConfig().to_dict()
        unknown = sorted(set(minimum) - set(defaults))
        if unknown:  # refused when the policy is loaded, not at the first job
            raise ValueError(f"TrainingRequirements: unknown training settings {unknown}")
        self.minimum = {key: float(value) for key, value in minimum.items()}
        self.defaults = {key: defaults[key] for key in self.minimum}
        self.allow_label_sampling = bool(allow_label_sampling)
        self.default_sampling = defaults["patch_sampling"]

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        site = receiving_site(fl_ctx)
        train = dxo.data.get("train")
        if not isinstance(train, dict):
            raise ProtocolError("the run configuration has no training settings", site=site, field="train")
        for key, least in self.minimum.items():
            value = train.get(key, self.defaults[key])
            if not is_number(value) or not value >= least:
                self._refuse(fl_ctx, f"requires {key} >= {least:g}; the job asks for {value!r}", site, key)
        if "nopeek_weight" in self.minimum and train.get("nopeek_levels") is not None:
            # The required weight holds on every level the site sends: a job may not exempt some of them.
            self._refuse(fl_ctx, f"requires NoPeek on every level it sends; the job limits it to levels "
                                 f"{train['nopeek_levels']!r}", site, "nopeek_levels")
        if not self.allow_label_sampling and train.get("patch_size") is not None:
            sampling = train.get("patch_sampling", self.default_sampling)
            if sampling != "uniform":  # "label", or anything the site cannot vouch for
                self._refuse(fl_ctx, f"refuses label sampling (patch corners centred on the label holder's tumour "
                                     f"voxels); the job asks for patch_sampling {sampling!r}", site, "patch_sampling")
        return None

    def _refuse(self, fl_ctx: FLContext, requirement: str, site: str | None, key: str) -> None:
        """Log and raise the refusal of a training setting, naming the site and ``train.<key>``."""
        error = ProtocolError(f"this site's privacy policy {requirement}", site=site, field=f"train.{key}")
        self.log_error(fl_ctx, str(error))
        raise error

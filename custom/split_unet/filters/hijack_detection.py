"""A site's check that the gradients it receives come from the segmentation decoder, not a hijacking server.

A feature-space hijacking server (Pasquini et al. 2021; ``split_unet.studies.hijacking``) sends, in place
of the decoder's gradient, a discriminator's: "make your features look like my pilot encoder's". In the
spirit of SplitGuard (Erdogan et al. 2022), the site checks a property of honest gradients it can verify
without labels or any knowledge of the server's weights:

**An honest gradient has no spatial mean.** Every path from a sent feature map to the loss starts in the
decoder with a convolution followed by instance normalisation, and instance normalisation's backward pass
removes each channel's spatial mean; a convolution (the same weights at every voxel) passes a zero-mean
gradient on with a (nearly) zero mean. Measured: the fraction of each channel's gradient energy in its
spatial mean is below 1e-9 for the project's networks, at every step. A discriminator judges features as a
whole (it pools over space), so its gradient pushes every voxel of a channel the same way: most of its
energy is in the mean.

The statistic (``spatial_mean_ratio``) is, per sample and channel, ``N x mean(g)^2 / mean(g^2)`` over
the channel's ``N`` voxels, averaged over samples, channels and levels: 0 for an honest gradient, about 1
for noise independent across voxels (e.g. the server's ``GradientProtection`` noise: a chi-square mean of
1 per channel), and hundreds for the hijacking gradients measured in the study (from step 1). The
threshold (default 10) sits far above the noise's (a mean of B x C chi-square(1) variables exceeding 10 has
probability below 1e-7 for B x C >= 4) and far below the attack's.

Limits: an attacker who knows this check can project the spatial mean out of its gradient; the study did
not measure such an adaptive attack. The check is tied to decoders that normalise first (as every
network this project builds does): calibrate it on an honest run (``split_unet.studies.hijacking``) before
using it with another decoder.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.server_engine_spec import ServerEngineSpec
from nvflare.apis.shareable import Shareable

from split_unet.errors import ProtocolError
from split_unet.files import write_json
from split_unet.protocol.wire import KIND_REQUEST, TensorMessage

from .base import receiving_site

ALARM_FILE = "hijack_alarm.json"
DEFAULT_THRESHOLD = 10.0


def spatial_mean_ratio(gradients: Mapping[int, torch.Tensor]) -> float:
    """Mean over samples, channels and levels of ``N x mean(g)^2 / mean(g^2)`` over each channel's ``N`` voxels.

    ``gradients``: ``{level: (B, C_l, *S_l)}``. A channel with an all-zero gradient counts 0.
    """
    ratios = []
    for gradient in gradients.values():
        flat = gradient.double().flatten(2)
        energy = flat.pow(2).mean(dim=2)
        ratio = flat.shape[2] * flat.mean(dim=2).pow(2) / energy.clamp_min(torch.finfo(torch.float64).tiny)
        ratios.append(ratio.flatten())
    return float(torch.cat(ratios).mean()) if ratios else 0.0


class HijackAlarm(ProtocolError):
    """Received gradients failed the check; ``statistics`` holds what was measured."""

    def __init__(self, message: str, statistics: dict, *, site: str | None, field: str):
        super().__init__(message, site=site, field=field)
        self.statistics = statistics


class HijackMonitor:
    """The check itself, outside NVFlare: ``observe`` every received gradient; once it has alarmed it refuses
    every later one too (a server caught once is not trusted again in this run).

    Args:
        threshold: alarm when ``spatial_mean_ratio`` exceeds it.
        site: the site named in the alarm.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, site: str | None = None):
        if threshold <= 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self.threshold = threshold
        self.site = site
        self.alarm: dict | None = None

    def observe(self, gradients: Mapping[int, torch.Tensor], step: int | None = None) -> dict:
        """The statistics of one received gradient ``{level: (B, C_l, *S_l)}``; raises ``HijackAlarm``."""
        statistics = {"step": step, "spatial_mean_ratio": spatial_mean_ratio(gradients), "threshold": self.threshold}
        field = f"{KIND_REQUEST}[step {step}]" if step is not None else KIND_REQUEST
        if self.alarm is not None:
            raise HijackAlarm(f"gradients refused since the alarm at step {self.alarm['step']}", statistics,
                              site=self.site, field=field)
        if statistics["spatial_mean_ratio"] > self.threshold:
            self.alarm = statistics
            raise HijackAlarm(f"received gradients look crafted, not the decoder's: spatial-mean ratio "
                              f"{statistics['spatial_mean_ratio']:.3g} > {self.threshold:g} (an honest decoder's "
                              f"gradient has none; a feature-space hijacking server's has much)", statistics,
                              site=self.site, field=field)
        return statistics


class GradientAnomalyDetector(DXOFilter):
    """Site-side ``task_data_filter`` (privacy policy or job) on the tasks that carry gradients: train,
    validate, finish. It changes nothing; on an alarm it refuses the task (NVFlare answers the server with
    ``TASK_DATA_FILTER_ERROR``, the site's log names the site, step and statistic) and records the alarm in the
    site's run folder (``hijack_alarm.json``; ``<site>_hijack_alarm.json`` in the server's where the simulator
    runs the policy); every later gradient of the run is refused too.

    Args:
        threshold: alarm when ``spatial_mean_ratio`` of a received gradient exceeds it.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        super().__init__(supported_data_kinds=[KIND_REQUEST], data_kinds_to_filter=[KIND_REQUEST])
        HijackMonitor(threshold)  # refuses a bad threshold when the policy is loaded, not at the first task
        self.threshold = threshold
        # One monitor per receiving site: one at a site, every site's where the simulator runs the policy
        # in the server process (tasks of different sites there run on different threads).
        self.monitors: dict[str | None, HijackMonitor] = {}
        self._lock = threading.Lock()

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        site = receiving_site(fl_ctx)
        message = TensorMessage.from_shareable(dxo.to_shareable(), KIND_REQUEST, site=site)
        if not message.tensors:
            return None
        with self._lock:
            monitor = self.monitors.setdefault(site, HijackMonitor(self.threshold, site))
        try:
            monitor.observe(message.tensors, message.tensor_step)
        except HijackAlarm as alarm:
            self.log_error(fl_ctx, str(alarm))
            self._record(alarm, monitor, fl_ctx)
            raise
        return None

    def _record(self, alarm: HijackAlarm, monitor: HijackMonitor, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        if engine is None or not fl_ctx.get_job_id():
            return
        run_dir = Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()))
        name = ALARM_FILE if not isinstance(engine, ServerEngineSpec) else f"{alarm.site}_{ALARM_FILE}"
        write_json(run_dir / name, {"site": alarm.site, "message": alarm.detail, "first_alarm": monitor.alarm,
                                    "refused": alarm.statistics})

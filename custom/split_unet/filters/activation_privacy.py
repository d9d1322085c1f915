"""Activation clipping and Gaussian noise at the site, with an (epsilon, delta) accountant.

Each patient's activation is clipped per level to an L2 norm of at most ``clip_norm`` and Gaussian noise
of standard deviation ``noise_multiplier * clip_norm`` is added to every element: one Gaussian mechanism
per level and release. Batches are a shuffled partition of the patients, not Poisson samples, so no
privacy amplification by subsampling is claimed: a patient's privacy loss is the composition of the
releases of its own activations (every training epoch, every validation), computed exactly as Gaussian DP
(``accounting.gaussian_epsilon``). The budget goes to the site's run folder (``privacy_budget.json``, and TensorBoard
``privacy/epsilon`` against the training step there) and, in the reply's ``info`` with the parameters it follows
from, to the server, which recomputes it.

The encoder's backward pass treats the clipping factor as a constant (the gradient arrives for the
noised activations); this is the usual approximation for output perturbation in split learning.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext

from split_unet.accounting import gaussian_epsilon
from split_unet.ids import is_integer
from split_unet.protocol.telemetry import SiteTelemetry
from split_unet.protocol.wire import KIND_ACTIVATIONS, TensorMessage

from .base import TensorMessageFilter

BUDGET_FILE = "privacy_budget.json"
EPSILON_TAG = "privacy/epsilon"


def clip_per_sample(tensor: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each sample (axis 0) of (B, ...) down to an L2 norm of at most ``clip_norm``."""
    norms = tensor.flatten(1).norm(dim=1).clamp_min(1e-12)
    factors = (clip_norm / norms).clamp(max=1.0)
    return tensor * factors.view(-1, *([1] * (tensor.dim() - 1)))


class ActivationClipNoise(TensorMessageFilter):
    """Site-side ``task_result_filter`` on the training, validation and inference tasks.

    Args:
        clip_norm: per-sample, per-level L2 bound.
        noise_multiplier: noise standard deviation in units of ``clip_norm``.
        delta: the delta of the reported (epsilon, delta).
        levels: levels to protect (default: every level sent).
        seed: noise seed (default: nondeterministic, as a privacy mechanism should be).
    """

    kinds = (KIND_ACTIVATIONS,)

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                 levels: Sequence[int] | None = None, seed: int | None = None):
        super().__init__()
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError("clip_norm must be positive and noise_multiplier non-negative")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.levels = None if levels is None else sorted(set(levels))
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.releases: Counter[str] = Counter()  # patient id -> Gaussian mechanisms applied to its data
        self.telemetry: SiteTelemetry | None = None

    def protect(self, tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Clip and noise the protected levels; ``(B, C_l, *S_l)`` in and out."""
        protected = {}
        for level, tensor in tensors.items():
            if self.levels is not None and level not in self.levels:
                protected[level] = tensor
                continue
            noise = torch.randn(tensor.shape, generator=self.generator).to(tensor.device, tensor.dtype)
            noise = noise * (self.noise_multiplier * self.clip_norm)
            protected[level] = clip_per_sample(tensor, self.clip_norm) + noise
        return protected

    def epsilon(self) -> float:
        """The largest epsilon of any patient so far."""
        worst = max(self.releases.values(), default=0)
        return gaussian_epsilon(self.noise_multiplier, worst, self.delta)

    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        if not message.tensors:
            return None
        message.tensors = self.protect(message.tensors)
        protected_levels = sum(1 for level in message.tensors if self.levels is None or level in self.levels)
        for patient in message.patient_ids:
            self.releases[patient] += protected_levels
        epsilon = self.epsilon()
        # The mechanism's parameters travel with its epsilon, so that the server recomputes the epsilon
        # (``controller.check_privacy_report``) instead of taking a number on trust.
        # The noise makes an all-zero window's activations differ from window to window, so the executor's
        # ``empty_windows`` (which windows hold no image here) would tell the server what the release hides: dropped.
        info = {key: value for key, value in message.info.items() if key != "empty_windows"}
        message.info = {**info, "dp_epsilon": epsilon, "dp_delta": self.delta,
                        "dp_noise_multiplier": self.noise_multiplier, "dp_releases": max(self.releases.values()),
                        "dp_levels": None if self.levels is None else sorted(self.levels)}
        engine = fl_ctx.get_engine()
        if engine is not None and fl_ctx.get_job_id():
            run_dir = Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()))
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / BUDGET_FILE).write_text(json.dumps({
                "epsilon": epsilon, "delta": self.delta, "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier, "max_releases_per_patient": max(self.releases.values()),
                "patients": len(self.releases)}, indent=2))
            self._log_epsilon(run_dir, epsilon, message.info.get("train_step"))
        return message

    def _log_epsilon(self, run_dir: Path, epsilon: float, train_step: object) -> None:
        """TensorBoard's epsilon at the training step a training answer carries (the executor echoes the
        server's); validation releases show in the next training step's value and in the budget file. The
        filter writes it, not the executor: a site's privacy policy adds the filter without the job knowing."""
        if not is_integer(train_step) or train_step < 0:
            return
        if self.telemetry is None or self.telemetry.run_dir != run_dir:
            if self.telemetry is not None:
                self.telemetry.close()
            self.telemetry = SiteTelemetry(run_dir)
        self.telemetry.scalar(EPSILON_TAG, epsilon, train_step)

"""The two roles of split learning as plain PyTorch objects; the NVFlare glue only moves their tensors.

``EncoderParty`` lives at a site: it runs the site's encoder and, when the gradient of its last
activations comes back, finishes that backward pass and steps its optimiser. ``DecoderParty`` lives
at the label holder: it fuses the sites' activations, decodes, computes the loss, steps the decoder and
returns the gradient of each site's activations.

With ``amp`` on a CUDA device each party runs its network under float16 autocast and scales its own loss
(``torch.amp.GradScaler``): the decoder scales the loss and unscales the gradients it returns; a site scales the
gradient it receives before its float16 backward pass. What leaves a party is float32 either way. A step whose
gradients overflow is skipped by every scaler downstream of the overflow (non-finite gradients propagate).
On the CPU nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from split_unet.errors import ProtocolError
from split_unet.networks import FusionDecoder, ModalityEncoder

from .adversarial import InversionAdversary
from .nopeek import spatial_nopeek_loss
from .objective import autocast, grad_scaler, segmentation_loss

Features = dict[int, torch.Tensor]


def dropped_input(probability: float, num_inputs: int, seed: int, step: int) -> int | None:
    """Modality dropout: the input (site) left out of training step ``step``, or None.

    With ``probability`` one input, chosen uniformly, is left out. Drawn from (seed, step) alone, so a
    resumed run draws the same as an uninterrupted one and no generator state has to be saved.
    """
    if probability <= 0 or num_inputs < 2:
        return None
    rng = np.random.default_rng([seed, step])
    return int(rng.integers(num_inputs)) if rng.random() < probability else None


def present_inputs(absent: int | Iterable[int] | None, num_inputs: int) -> list[bool] | None:
    """The fusion's ``present`` mask with input(s) ``absent`` left out (None: every input present)."""
    absent = set() if absent is None else {absent} if isinstance(absent, int) else set(absent)
    return [k not in absent for k in range(num_inputs)] if absent else None


def make_optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam is per-parameter, so per-part optimisers equal one optimiser over the composed network."""
    return torch.optim.Adam(parameters, lr=lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group (``schedule.learning_rate`` of the step about to be taken)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class EncoderParty:
    """A site's encoder, its optimiser and the activations waiting for their gradient."""

    def __init__(self, encoder: ModalityEncoder, lr: float, device: torch.device, site: str | None = None,
                 nopeek_weight: float = 0.0, seed: int = 0, amp: bool = False,
                 adversary: InversionAdversary | None = None, adversarial_weight: float = 0.0,
                 nopeek_levels: Sequence[int] | None = None):
        self.encoder = encoder.to(device)
        self.optimizer = make_optimizer(self.encoder.parameters(), lr)
        self.device = device
        self.amp = amp
        self.scaler = grad_scaler(device, amp)
        self.site = site
        self.nopeek_weight = nopeek_weight
        self.nopeek_levels = None if nopeek_levels is None else set(nopeek_levels)  # None: every sent level
        self._generator = torch.Generator().manual_seed(seed)
        self._pending: Features | None = None
        self.last_nopeek_loss: float | None = None  # the NoPeek term of the last backward pass (unweighted)
        self._pending_images: torch.Tensor | None = None
        if adversarial_weight > 0 and adversary is None:
            raise ValueError("adversarial_weight > 0 needs an adversary (the site's inversion decoder)")
        self.adversary = adversary
        self.adversarial_weight = adversarial_weight
        self.last_adversarial_loss: float | None = None  # the encoder's term against the adversary (unweighted)
        self.warmed_up = False  # the local privacy warm-up ran (``warm_up``)

    @property
    def awaiting_gradient(self) -> bool:
        return self._pending is not None

    @property
    def largest_pending(self) -> int:
        """Elements of the largest pending activation (0 if none): the bound on a gradient to accept."""
        return max((t.numel() for t in (self._pending or {}).values()), default=0)

    def forward(self, images: np.ndarray | torch.Tensor) -> Features:
        """(B, C, *S) images -> detached CPU features; the graph is kept for ``backward``."""
        if self._pending is not None:
            raise ProtocolError("new training batch before the gradient of the previous one arrived",
                                site=self.site, field="gradient")
        self.encoder.train()
        inputs = torch.as_tensor(images, device=self.device)
        with autocast(self.device, self.amp):
            features = self.encoder(inputs)
        self._pending, self._pending_images = features, inputs
        return {level: t.detach().float().cpu() for level, t in features.items()}

    def state_dict(self) -> dict:
        """What a resumed site needs: weights, optimiser and NoPeek generator (no activations may be pending)."""
        if self._pending is not None:
            raise ProtocolError("cannot checkpoint while activations await their gradient", site=self.site,
                                field="checkpoint")
        adversary = {"adversary": self.adversary.state_dict()} if self.adversary is not None else {}
        return {"encoder": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self._generator.get_state(), "warmed_up": self.warmed_up, **adversary,
                **_scaler_state(self.scaler)}

    def load_state_dict(self, state: Mapping) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._generator.set_state(state["generator"])
        self.warmed_up = bool(state.get("warmed_up", False))
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
        _load_scaler_state(self.scaler, state)

    def warm_up(self, batches: Iterable[np.ndarray | torch.Tensor]) -> int:
        """Local steps on the site's privacy terms alone, before the first activations leave the site.

        batches: (B, C, *S) image batches of the site's own patients. The server's gradient is not involved,
        nothing is sent: the first release already comes from an encoder trained against inversion.
        Returns the number of steps taken.
        """
        if self._pending is not None:
            raise ProtocolError("warm-up while activations await their gradient", site=self.site, field="warm_up")
        if self.nopeek_weight <= 0 and self.adversarial_weight <= 0:
            raise ValueError("a privacy warm-up needs nopeek_weight or adversarial_weight above 0")
        steps = 0
        for images in batches:
            self.encoder.train()
            inputs = torch.as_tensor(images, device=self.device)
            with autocast(self.device, self.amp):
                features = self.encoder(inputs)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(torch.stack(self._privacy_terms(features, inputs)).sum()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            steps += 1
        self.warmed_up = True
        return steps

    def _privacy_terms(self, features: Features, images: torch.Tensor) -> list[torch.Tensor]:
        """The site's own weighted privacy losses on ``features`` (with their graph) of ``images`` (B, C, *S).

        The adversary first takes its step on these very features (detached), then the encoder's term is
        computed against the updated adversary.
        """
        features = {level: t.float() for level, t in features.items()}
        terms = []
        if self.nopeek_weight > 0:
            decorrelated = {level: t for level, t in features.items()
                            if self.nopeek_levels is None or level in self.nopeek_levels}
            nopeek = spatial_nopeek_loss(images, decorrelated, generator=self._generator)
            self.last_nopeek_loss = float(nopeek.detach())
            terms.append(self.nopeek_weight * nopeek)
        if self.adversarial_weight > 0:
            self.adversary.fit(features, images)
            adversarial = self.adversary.encoder_loss(features)
            self.last_adversarial_loss = float(adversarial.detach())
            terms.append(self.adversarial_weight * adversarial)
        return terms

    @torch.no_grad()
    def infer(self, images: np.ndarray | torch.Tensor) -> Features:
        """Evaluation-mode features, no graph kept."""
        self.encoder.eval()
        with autocast(self.device, self.amp):
            features = self.encoder(torch.as_tensor(images, device=self.device))
        return {level: t.float().cpu() for level, t in features.items()}

    def set_learning_rate(self, lr: float) -> None:
        """The rate of the encoder's next optimiser steps (set before the forward pass of a training step)."""
        set_learning_rate(self.optimizer, lr)

    def backward(self, gradients: Mapping[int, torch.Tensor]) -> None:
        """Finish the backward pass of the pending activations and take one optimiser step."""
        if self._pending is None:
            raise ProtocolError("gradient received but no activations are pending", site=self.site, field="gradient")
        if set(gradients) != set(self._pending):
            raise ProtocolError(f"gradient levels {sorted(gradients)} do not match the sent levels "
                                f"{sorted(self._pending)}", site=self.site, field="gradient")
        tensors, grads = [], []
        for level, activation in self._pending.items():
            grad = torch.as_tensor(gradients[level], device=self.device, dtype=torch.float32)
            if grad.shape != activation.shape:
                raise ProtocolError(f"gradient shape {tuple(grad.shape)} != activation shape "
                                    f"{tuple(activation.shape)}", site=self.site, field=f"gradient[{level}]")
            tensors.append(activation)
            grads.append(self.scaler.scale(grad).to(activation.dtype))
        if terms := self._privacy_terms(self._pending, self._pending_images):  # join the server's gradient
            tensors.append(torch.stack(terms).sum())
            grads.append(self.scaler.scale(torch.ones((), device=self.device)))
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(tensors, grads)
        self.scaler.step(self.optimizer)  # unscales; skips the step if the gradients overflowed
        self.scaler.update()
        self._pending = self._pending_images = None


class DecoderParty:
    """The label holder's decoder, its optimiser and the loss."""

    def __init__(self, decoder: FusionDecoder, lr: float, device: torch.device, micro_batches: int = 1,
                 checkpointing: bool = False, amp: bool = False):
        self.decoder = decoder.to(device)
        self.decoder.checkpointing = checkpointing
        self.optimizer = make_optimizer(self.decoder.parameters(), lr)
        self.loss_function = segmentation_loss()
        self.device = device
        self.micro_batches = micro_batches
        self.amp = amp
        self.scaler = grad_scaler(device, amp)

    def set_learning_rate(self, lr: float) -> None:
        """The rate of the decoder's next optimiser steps."""
        set_learning_rate(self.optimizer, lr)

    def train_step(self, features: Sequence[Mapping[int, torch.Tensor]], target: np.ndarray | torch.Tensor,
                   present: Sequence[bool] | None = None) -> tuple[float, list[Features]]:
        """One decoder step. features: K dicts of (B, C_l, *S_l); target: (B, 3, *S) region masks;
        present: K booleans, False for a site left out of this step (its dict is empty; see ``FusionDecoder``).

        Returns the loss and, per site, the gradient of the loss w.r.t. that site's activations (an empty dict
        for a site left out: it has nothing to step on).

        With ``micro_batches`` > 1 the batch runs in that many parts, each part's loss weighted by its share of
        the batch, so the accumulated gradients are those of the whole batch (Dice per patient and voxel-mean
        cross-entropy are means over patients; instance norm works per patient) at a fraction of the memory.
        """
        # Leaves of the party's own (detach): the caller's tensors must not collect gradients across steps.
        inputs = [
            {level: torch.as_tensor(t, device=self.device, dtype=torch.float32).detach().requires_grad_()
             for level, t in site_features.items()}
            for site_features in features
        ]
        target = torch.as_tensor(target, device=self.device, dtype=torch.float32)
        self.decoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for part in torch.arange(len(target)).tensor_split(self.micro_batches):
            rows = slice(int(part[0]), int(part[-1]) + 1)
            with autocast(self.device, self.amp):
                logits = self.decoder([{level: t[rows] for level, t in site.items()} for site in inputs], present)
            loss = self.loss_function(logits.float(), target[rows]) * (len(part) / len(target))
            self.scaler.scale(loss).backward()  # frees this part's graph; the gradients add up in the leaves
            total += float(loss.detach())
        scale = self.scaler.get_scale()  # 1.0 without AMP: the gradients as they are, no copy of every level
        gradients = [{level: (t.grad if scale == 1.0 else t.grad / scale).detach().cpu()
                      for level, t in site_inputs.items()} for site_inputs in inputs]
        if self.scaler.is_enabled() and not all(torch.isfinite(g).all() for site in gradients for g in site.values()):
            # The scaled loss overflowed: the decoder skips this step, and the sites get zeros instead of
            # non-finite gradients (a site without AMP has no scaler to skip them).
            gradients = [{level: torch.zeros_like(g) for level, g in site.items()} for site in gradients]
        self.scaler.step(self.optimizer)  # unscales; skips the step if the gradients overflowed
        self.scaler.update()
        return total, gradients

    def state_dict(self) -> dict:
        return {"decoder": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                **_scaler_state(self.scaler)}

    def load_state_dict(self, state: Mapping) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        _load_scaler_state(self.scaler, state)

    @torch.no_grad()
    def predict(self, features: Sequence[Mapping[int, torch.Tensor]],
                present: Sequence[bool] | None = None) -> torch.Tensor:
        """Logits (B, 3, *S) in evaluation mode; ``present`` as in ``train_step``."""
        self.decoder.eval()
        inputs = [{level: torch.as_tensor(t, device=self.device, dtype=torch.float32) for level, t in f.items()}
                  for f in features]
        with autocast(self.device, self.amp):
            return self.decoder(inputs, present).float()


def _scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """The loss scale a resumed party continues from; nothing without AMP (checkpoints stay as they were)."""
    return {"scaler": scaler.state_dict()} if scaler.is_enabled() else {}


def _load_scaler_state(scaler: torch.amp.GradScaler, state: Mapping) -> None:
    if scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])

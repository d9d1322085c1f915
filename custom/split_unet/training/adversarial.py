"""Site-local adversarial training against an inversion decoder, and the privacy warm-up.

The site trains a decoder of its own to reconstruct its images from the activations it sends (what a
learned inversion attack does with auxiliary images) and trains its encoder to defeat that decoder,
alongside the server's gradient. Everything happens at the site: nothing new travels.

The encoder's term pulls the decoder's reconstruction towards the site's population prior (its mean
image, the atlas), not away from the image: ``MSE(decoder(features), atlas)``. Why this form and not
``-MSE(decoder(features), image)``: that one is unbounded (the encoder wins by blowing the error up, e.g.
by inverting the contrast, which keeps every detail and an attacker undoes), while this one is bounded
below by 0 and its optimum is exactly the privacy target the report scores, a reconstruction no better
than the prior.

The warm-up (``EncoderParty.warm_up`` on ``warmup_batches``) trains the encoder on these site-local terms
alone before its first release, so that step 1 is protected too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from split_unet.networks import FusionDecoder

Features = Mapping[int, torch.Tensor]


class InversionAdversary:
    """A site's inversion decoder, its optimiser and the encoder's term against it.

    Args:
        decoder: features ``{level: (B, C_l, *S_l)}`` -> images (B, C, *S) (``networks.build_inversion_decoder``).
        atlas: (1, C, *S) the site's mean image, the reconstruction the encoder steers the decoder to.
        lr: the decoder's Adam step size.
        device: where the decoder runs.
    """

    def __init__(self, decoder: FusionDecoder, atlas: torch.Tensor, lr: float, device: torch.device):
        if atlas.dim() < 3 or atlas.shape[0] != 1:
            raise ValueError(f"atlas must be (1, C, *S), got {tuple(atlas.shape)}")
        self.decoder = decoder.to(device)
        self.atlas = atlas.to(device=device, dtype=torch.float32)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        self.last_reconstruction_loss: float | None = None  # the decoder's MSE to the images at its last step

    def fit(self, features: Features, images: torch.Tensor) -> float:
        """One Adam step of the decoder towards ``images`` (B, C, *S) from detached ``features``; returns its MSE."""
        self.decoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.decoder([{level: t.detach().float() for level, t in features.items()}]),
                          images.float())
        loss.backward()
        self.optimizer.step()
        self.last_reconstruction_loss = float(loss.detach())
        return self.last_reconstruction_loss

    def encoder_loss(self, features: Features) -> torch.Tensor:
        """MSE between the decoder's reconstruction from ``features`` (with their graph) and the atlas.

        The decoder's weights are held fixed for this term: its gradient reaches the encoder only.
        """
        self.decoder.train()
        with _frozen(self.decoder):
            reconstruction = self.decoder([{level: t.float() for level, t in features.items()}])
        return F.mse_loss(reconstruction, self.atlas.expand_as(reconstruction))

    def state_dict(self) -> dict:
        return {"decoder": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "atlas": self.atlas.cpu()}

    def load_state_dict(self, state: Mapping) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.atlas = state["atlas"].to(self.atlas.device)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """The module's parameters take no gradient inside (the graph through the module is still built)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def mean_image(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean (1, C, *S) of images arriving in batches (B, C, *S): a site's atlas, one batch in memory at a time."""
    total, count = None, 0
    for batch in batches:
        batch = torch.as_tensor(batch, dtype=torch.float64)
        total = batch.sum(dim=0, keepdim=True) if total is None else total + batch.sum(dim=0, keepdim=True)
        count += batch.shape[0]
    if total is None:
        raise ValueError("no images to average")
    return (total / count).float()


def warmup_batches(patient_ids: Iterable[str], batch_size: int, steps: int, seed: int) -> list[list[str]]:
    """``steps`` batches of ``batch_size`` patients for the warm-up: seeded shuffled passes over the sorted ids."""
    ids = sorted(patient_ids)
    if not ids:
        raise ValueError("no patients to warm up on")
    generator = torch.Generator().manual_seed(seed)
    order: list[str] = []
    while len(order) < steps * batch_size:
        order += [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(steps)]

"""A malicious server: feature-space hijacking (Pasquini et al. 2021, "Unleashing the tiger"), and what a site's
``GradientAnomalyDetector`` sees of it.

The server does not train the segmentation model. It trains, on auxiliary images of the site's modality, a
pilot encoder of the site's architecture and a pilot decoder that inverts it (an autoencoder), and a
discriminator that tells the pilot's features from the site's. Instead of the decoder's gradient it sends the
site the gradient that makes the site's features look like the pilot's to the discriminator; the site's
optimiser follows it, its encoder drifts into the pilot's feature space, and the pilot decoder inverts what
the site sends.

Plain PyTorch on the project's ``EncoderParty`` (the site, as in the federation) and networks, small sizes:
this is a study of the attack and of the detector's statistics, not an NVFlare run. The honest reference is
split learning as the federation runs it (``EncoderParty`` per modality, ``DecoderParty`` with the labels).

    python -m split_unet.studies.hijacking --sites DATA/sites --out runs/hijacking

writes ``hijacking.json``: per run, the detector's statistics at every step, the step it alarmed at (or
none) and, for the attack, the reconstruction's SSIM and its excess over the atlas of the auxiliary images.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from split_unet.data import MODALITIES, SERVER_SITE, SiteImages, SiteLabels
from split_unet.files import write_json
from split_unet.filters.hijack_detection import DEFAULT_THRESHOLD, HijackAlarm, HijackMonitor
from split_unet.filters.gradient_protection import relative_noise
from split_unet.leakage.metrics import prior_relative_similarity
from split_unet.networks import FusionDecoder, ModalityEncoder, NetworkConfig, build_decoder, build_encoder
from split_unet.training import DecoderParty, EncoderParty

RESULT_FILE = "hijacking.json"
TARGET_SITE = MODALITIES[0]


class LatentDiscriminator(nn.Module):
    """Scores a feature dict ``{level: (B, C_l, *S_l)}``: one small strided convolution stack per level,
    averaged over space, summed over levels -> (B,) logits (high: looks like the pilot's features)."""

    def __init__(self, spatial_dims: int, channels: Sequence[int], levels: Sequence[int], width: int = 16):
        super().__init__()
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.levels = tuple(levels)
        self.stacks = nn.ModuleDict({str(level): nn.Sequential(
            conv(channels[level], width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            conv(width, width, 3, stride=1, padding=1), nn.LeakyReLU(0.2)) for level in self.levels})
        self.heads = nn.ModuleDict({str(level): nn.Linear(width, 1) for level in self.levels})

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        logits = 0.0
        for level in self.levels:
            pooled = self.stacks[str(level)](features[level]).flatten(2).mean(dim=2)
            logits = logits + self.heads[str(level)](pooled)[:, 0]
        return logits


class FeatureSpaceHijacker:
    """The malicious server's side of one site (Pasquini et al. 2021: a Wasserstein critic with gradient penalty).

    Args:
        network: the job's network (the server knows the architecture it ships).
        aux_images: (N, 1, *S) auxiliary images of the site's modality, z-scored like the site's.
        lr: Adam step of the pilot pair and the discriminator.
        seed: initialisation and mini-batch sampling.
        penalty_weight: WGAN-GP's gradient-penalty weight.
        pretrain_steps: autoencoder steps on the auxiliary images before the federation starts (the server
            prepares its pilot pair offline).
    """

    def __init__(self, network: NetworkConfig, aux_images: torch.Tensor, lr: float = 1e-3, seed: int = 0,
                 penalty_weight: float = 10.0, pretrain_steps: int = 300):
        self.aux_images = aux_images.float()
        self.penalty_weight = penalty_weight
        levels = network.sent_levels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.pilot = ModalityEncoder(network.spatial_dims, 1, **network.encoder_args())
            self.inverse = FusionDecoder(network.spatial_dims, 1, out_channels=1, fusion="mean",
                                         **network.layer_args())
            self.discriminator = LatentDiscriminator(network.spatial_dims, network.sent_channels, levels)
        self.autoencoder_optimizer = torch.optim.Adam([*self.pilot.parameters(), *self.inverse.parameters()], lr=lr)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        for _ in range(pretrain_steps):
            self._autoencoder_step(self._aux_batch(2))

    def _autoencoder_step(self, batch: torch.Tensor) -> None:
        self.autoencoder_optimizer.zero_grad(set_to_none=True)
        F.mse_loss(self.inverse([self.pilot(batch)]), batch).backward()
        self.autoencoder_optimizer.step()

    def _aux_batch(self, size: int) -> torch.Tensor:
        return self.aux_images[torch.randperm(len(self.aux_images), generator=self.generator)[:size]]

    def _gradient_penalty(self, real: dict[int, torch.Tensor], fake: dict[int, torch.Tensor]) -> torch.Tensor:
        """WGAN-GP's penalty: the critic's gradient norm at points between real and fake features kept near 1."""
        weight = torch.rand(len(next(iter(real.values()))), generator=self.generator)
        mixed = {level: (weight.view(-1, *[1] * (r.dim() - 1)) * r + (1 - weight.view(-1, *[1] * (r.dim() - 1)))
                         * fake[level]).requires_grad_() for level, r in real.items()}
        grads = torch.autograd.grad(self.discriminator(mixed).sum(), list(mixed.values()), create_graph=True)
        norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
        return (norm - 1).pow(2).mean()

    def step(self, site_features: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One server step on the site's features: train the pilot pair and the discriminator, then return the
        crafted gradient ``{level: (B, C_l, *S_l)}`` in place of the decoder's."""
        batch = self._aux_batch(len(next(iter(site_features.values()))))
        self._autoencoder_step(batch)

        with torch.no_grad():
            pilot_features = self.pilot(batch)
        fake = {level: t.detach() for level, t in site_features.items()}
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        (self.discriminator(fake).mean() - self.discriminator(pilot_features).mean()
         + self.penalty_weight * self._gradient_penalty(pilot_features, fake)).backward()
        self.discriminator_optimizer.step()

        steered = {level: t.detach().clone().requires_grad_() for level, t in site_features.items()}
        gradients = torch.autograd.grad(-self.discriminator(steered).mean(), list(steered.values()))
        return dict(zip(steered, (g.detach() for g in gradients)))

    @torch.no_grad()
    def reconstruct(self, site_features: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, 1, *S): the pilot decoder applied to what the site sent."""
        self.inverse.eval()
        try:
            return self.inverse([site_features])
        finally:
            self.inverse.train()


def _batches(patient_ids: Sequence[str], batch_size: int, steps: int, seed: int) -> list[list[str]]:
    """``steps`` batches of shuffled epochs over ``patient_ids``, as the federation's schedule draws them."""
    rng = np.random.default_rng(seed)
    batches: list[list[str]] = []
    while len(batches) < steps:
        order = list(rng.permutation(patient_ids))
        batches += [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return batches[:steps]


def run_honest(images: dict[str, SiteImages], labels: SiteLabels, patient_ids: Sequence[str], network: NetworkConfig,
               steps: int, seed: int, lr: float = 5e-3, batch_size: int = 2) -> list[dict[int, torch.Tensor]]:
    """Split learning on every modality with the true decoder; the gradients ``TARGET_SITE`` received, per step."""
    device = torch.device("cpu")
    sites = {m: EncoderParty(build_encoder(network, k, seed), lr, device, m) for k, m in enumerate(images)}
    server = DecoderParty(build_decoder(network, len(sites), seed), lr, device)
    received = []
    for ids in _batches(patient_ids, batch_size, steps, seed):
        features = [party.forward(images[m].batch(ids)) for m, party in sites.items()]
        _, gradients = server.train_step(features, labels.batch(ids))
        for party, gradient in zip(sites.values(), gradients):
            party.backward(gradient)
        received.append(gradients[list(sites).index(TARGET_SITE)])
    return received


def run_hijacking(site_images: SiteImages, patient_ids: Sequence[str], aux_images: torch.Tensor,
                  network: NetworkConfig, steps: int, seed: int, lr: float = 5e-3, batch_size: int = 2,
                  score_every: int = 10, pretrain_steps: int = 300) -> tuple[list[dict[int, torch.Tensor]], list[dict]]:
    """The hijacked site's received gradients per step, and the reconstruction's scores every ``score_every``
    steps (on that step's batch, before the site steps on the crafted gradient)."""
    site = EncoderParty(build_encoder(network, 0, seed), lr, torch.device("cpu"), TARGET_SITE)
    server = FeatureSpaceHijacker(network, aux_images, seed=seed, pretrain_steps=pretrain_steps)
    atlas = aux_images.mean(dim=0)
    received, scores = [], []
    for step, ids in enumerate(_batches(patient_ids, batch_size, steps, seed), start=1):
        images = site_images.batch(ids)
        features = site.forward(images)
        if step == 1 or step % score_every == 0 or step == steps:
            # The attacker cannot tell the contrast's sign (a pilot decoder may invert a negated image): scored
            # sign-invariantly, as UnSplit is.
            similarity = prior_relative_similarity(server.reconstruct(features), images, atlas, sign_invariant=True)
            scores.append({"step": step, **{k: similarity[k] for k in ("ssim", "prior_ssim", "excess_ssim",
                                                                          "residual_ssim")}})
        gradient = server.step(features)
        site.backward(gradient)
        received.append(gradient)
    return received, scores


def detect(received: Sequence[dict[int, torch.Tensor]], threshold: float = DEFAULT_THRESHOLD
           ) -> tuple[int | None, list[float]]:
    """(first step the site's ``HijackMonitor`` alarms at, or None; its statistic at every step) on a run's
    received gradients. The statistic is measured after the alarm too, for the record."""
    monitor, alarm_step, trace = HijackMonitor(threshold, TARGET_SITE), None, []
    for step, gradient in enumerate(received, start=1):
        try:
            statistics = monitor.observe(gradient, step)
        except HijackAlarm as alarm:
            statistics = alarm.statistics
            alarm_step = alarm_step or step
        trace.append(statistics["spatial_mean_ratio"])
    return alarm_step, trace


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", required=True, help="partitioned phantom (``split-unet phantom``)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--honest-seeds", default="0,1,2,3,4")
    parser.add_argument("--attack-seeds", default="0,1,2")
    parser.add_argument("--aux", type=int, default=6, help="patients the server holds as auxiliary images")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="the server's offline pilot training")
    args = parser.parse_args(argv)
    network = NetworkConfig(channels=(4, 8, 16), strides=(2, 2))
    sites = Path(args.sites)
    images = {m: SiteImages(sites / m, args.size, site=m) for m in MODALITIES}
    labels = SiteLabels(sites / SERVER_SITE, args.size, site=SERVER_SITE)
    patients = images[TARGET_SITE].patient_ids
    aux_ids, site_ids = patients[:args.aux], patients[args.aux:]
    aux_images = torch.from_numpy(images[TARGET_SITE].batch(aux_ids))
    runs = {}
    for seed in (int(s) for s in args.honest_seeds.split(",")):
        received = run_honest(images, labels, site_ids, network, args.steps, seed)
        noise = torch.Generator().manual_seed(seed)
        for name, gradients in (("honest", received), ("honest + gradient noise x10", [
                {level: relative_noise(g, 10.0, noise) for level, g in step.items()} for step in received])):
            step, trace = detect(gradients, args.threshold)
            runs[f"{name}, seed {seed}"] = {"alarm_step": step, "spatial_mean_ratio": trace}
            print(f"{name}, seed {seed}: alarm at step {step}; statistic max {max(trace):.3g}", flush=True)
    for seed in (int(s) for s in args.attack_seeds.split(",")):
        received, scores = run_hijacking(images[TARGET_SITE], site_ids, aux_images, network, args.steps, seed,
                                         pretrain_steps=args.pretrain_steps)
        step, trace = detect(received, args.threshold)
        runs[f"hijacking, seed {seed}"] = {"alarm_step": step, "spatial_mean_ratio": trace, "reconstruction": scores}
        best = max(scores, key=lambda s: s["excess_ssim"])
        print(f"hijacking, seed {seed}: alarm at step {step}; statistic min {min(trace):.3g}; best reconstruction "
              f"{best}", flush=True)
    result = {"threshold": args.threshold, "pretrain_steps": args.pretrain_steps, "size": args.size, "steps": args.steps, "network": network.to_dict(), "aux_patients": len(aux_ids),
              "site_patients": len(site_ids), "runs": runs}
    write_json(Path(args.out) / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    main()

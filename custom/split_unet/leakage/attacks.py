"""Attacks of an honest-but-curious server on what split learning exchanges (plain PyTorch).

Input reconstruction from a site's activations, weakest attacker last:

- ``whitebox_inversion``: the attacker has the encoder's weights (an upper bound on leakage).
- ``learned_inversion``: the attacker trained a decoder from features back to images on auxiliary
  images of the same modality, with query access to the site's encoder (``train_inversion_decoder``).
- ``surrogate_inversion``: no query access either: the attacker trains its own encoder of the site's
  architecture and a decoder that inverts it on auxiliary images (``train_surrogate_autoencoder``), then maps
  the site's feature space into its surrogate's with a per-level 1x1x1 adaptor fitted on the recorded
  activations alone.
- model completion (``train_completion_encoders``): the server completes its own trained decoder, frozen, with
  surrogate encoders of its own trained through it on labelled auxiliary patients; their feature spaces are what the
  decoder reads, the sites' too, so a decoder that inverts a surrogate (``train_inversion_decoder``) is applied to
  the recorded activations as they are.
- ``unsplit_inversion``: UnSplit (Erdogan et al., 2022): the attacker knows only the architecture and
  fits a surrogate encoder together with the input.

Label leakage at a site: ``gradient_label_leakage`` estimates the tumour mask from the gradients the
site receives; ``random_mask_like`` is the chance baseline.

Shapes: ``B`` batch, ``S`` the image's spatial shape, ``S_l`` level ``l``'s. Activations and gradients
are ``{level: (B, C_l, *S_l)}`` dicts as recorded (``split_unet.leakage.record``). Every attack is
deterministic for a given ``seed`` (bitwise on the CPU; on CUDA up to cuDNN's nondeterministic kernels,
see ``torch.use_deterministic_algorithms``) and leaves the global random state untouched; it runs on the
device of the encoder (or decoder) it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu
from torch import nn

from split_unet.networks import FusionDecoder, ModalityEncoder

Features = Mapping[int, torch.Tensor]

__all__ = [
    "FeatureAdaptor", "gradient_label_leakage", "gradient_magnitude", "learned_inversion", "random_mask_like",
    "surrogate_inversion", "total_variation", "train_completion_encoders", "train_inversion_decoder",
    "train_surrogate_autoencoder",
    "unsplit_inversion", "whitebox_inversion",
]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators inside, restore their state outside (for module initialisation)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode with no parameter gradients; its mode and ``requires_grad`` flags restored after.

    Eval mode only turns dropout off: MONAI's instance norm keeps no running statistics, so training-time
    activations (train mode) equal eval-mode ones without dropout, and dropout's noise is unknown to an
    attacker anyway.
    """
    training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        module.train(training)
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _targets(activations: Features, device: torch.device) -> dict[int, torch.Tensor]:
    return {int(level): torch.as_tensor(t, dtype=torch.float32, device=device) for level, t in activations.items()}


def _matching_loss(features: Features, targets: Features) -> torch.Tensor:
    """Sum over the observed levels of the MSE, each normalised by that level's energy per sample.

    The normalisation weighs a 64-channel bottleneck and an 8-channel full-resolution map alike, whatever
    their scale.
    """
    loss = 0.0
    for level, target in targets.items():
        dims = tuple(range(1, target.ndim))
        energy = target.pow(2).mean(dim=dims).clamp_min(1e-12)
        loss = loss + ((features[level] - target).pow(2).mean(dim=dims) / energy).mean()
    return loss


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbours along each spatial axis.

    ``x``: (B, C, *S) -> scalar.
    """
    return sum(x.diff(dim=axis).abs().mean() for axis in range(2, x.ndim))


def _initial_input(batch: int, image_shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """Small noise (B, 1, *S): a constant start would give instance norm nothing to normalise."""
    generator = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(batch, 1, *image_shape, generator=generator)).to(device).requires_grad_()


def _batch_size(activations: Features) -> int:
    return next(iter(activations.values())).shape[0]


def whitebox_inversion(encoder: ModalityEncoder, activations: Features, image_shape: Sequence[int],
                       iterations: int = 100, lr: float = 1.0, tv_weight: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Reconstruct the input of known encoder weights from its activations.

    An input ``x`` is optimised so that ``encoder(x)`` matches ``activations`` on the observed levels
    (``_matching_loss``) with a total-variation prior (``tv_weight``). The encoder is used in eval mode
    (see ``_frozen``) and is left unchanged. The optimiser is L-BFGS with a strong-Wolfe line search, not
    Adam: the objective is smooth and deterministic, and on a 16^3 phantom (channels 4, 8, 16) 50 passes
    of L-BFGS reached SSIM 1.00 (all levels sent) and 0.68 (levels 1-2) where 100 Adam steps reached 0.97
    and 0.40; an upper bound should not be held back by its optimiser.

    Args:
        encoder: the site's encoder with the weights that produced ``activations``.
        activations: ``{level: (B, C_l, *S_l)}``, any subset of the encoder's levels.
        image_shape: ``S``, the input's spatial shape.
        iterations: at most this many forward/backward passes of the encoder.
        lr: L-BFGS step scale.
        tv_weight: weight of ``total_variation(x)``.
        seed: seed of the initial ``x``.

    Returns:
        (B, 1, *S) reconstruction on the encoder's device; its intensity scale is arbitrary.
    """
    device = _device(encoder)
    targets = _targets(activations, device)
    x = _initial_input(_batch_size(targets), image_shape, seed, device)
    optimizer = torch.optim.LBFGS([x], lr=lr, max_iter=iterations, max_eval=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = _matching_loss(encoder(x), targets) + tv_weight * total_variation(x)
        loss.backward()
        return loss

    with _frozen(encoder):
        optimizer.step(closure)
    return x.detach()


def _attack_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _fresh_encoder(make_encoder: Callable[[], ModalityEncoder], seed: int, device: torch.device) -> ModalityEncoder:
    """``make_encoder()`` initialised from ``seed``: a factory may seed itself or load weights, so start afresh."""
    with _seeded(seed, device):
        encoder = make_encoder()
        for module in encoder.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return encoder.to(device)


def unsplit_inversion(make_encoder: Callable[[], ModalityEncoder], activations: Features,
                      image_shape: Sequence[int], iterations: int = 200, lr: float = 0.1, tv_weight: float = 1e-3,
                      seed: int = 0, model_lr: float = 1e-3, inner_steps: int = 1,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """UnSplit (Erdogan et al., 2022): reconstruct the input knowing only the encoder's architecture.

    A surrogate encoder (``make_encoder()``, initialised from ``seed``) and the input ``x`` are optimised
    in turn: ``inner_steps`` Adam steps on ``x`` (matching loss + TV prior), then ``inner_steps`` on the
    surrogate's weights (matching loss), until ``x`` has had ``iterations`` steps.

    Args:
        make_encoder: builds an encoder of the site's architecture (any weights: they are re-initialised).
        activations, image_shape, tv_weight, seed: as in ``whitebox_inversion``.
        iterations, lr: Adam steps and step size on ``x``.
        model_lr: Adam step size on the surrogate's weights.
        inner_steps: steps on one side before switching to the other.
        device: where to run (default: CUDA when present).

    Returns:
        (B, 1, *S) reconstruction. Its sign is arbitrary too: a surrogate with negated first-layer
        weights explains a negated input as well, so score it with ``image_similarity(...,
        sign_invariant=True)``.
    """
    device = _attack_device(device)
    surrogate = _fresh_encoder(make_encoder, seed, device).eval()  # no dropout noise in the fit
    targets = _targets(activations, device)
    x = _initial_input(_batch_size(targets), image_shape, seed, device)
    input_optimizer = torch.optim.Adam([x], lr=lr)
    model_optimizer = torch.optim.Adam(surrogate.parameters(), lr=model_lr)
    for step in range(iterations):
        surrogate.requires_grad_(False)  # each phase computes only the gradients it steps on
        input_optimizer.zero_grad(set_to_none=True)
        (_matching_loss(surrogate(x), targets) + tv_weight * total_variation(x)).backward()
        input_optimizer.step()
        if (step + 1) % inner_steps == 0:
            surrogate.requires_grad_(True)
            fixed = x.detach()
            for _ in range(inner_steps):
                model_optimizer.zero_grad(set_to_none=True)
                _matching_loss(surrogate(fixed), targets).backward()
                model_optimizer.step()
    return x.detach()


def _level_strides(encoder: ModalityEncoder, image: torch.Tensor) -> tuple[int, ...]:
    """Downsampling factor between consecutive levels, probed with one image (1, 1, *S)."""
    shapes = []
    x = image
    with torch.no_grad():
        for block in encoder.blocks:
            x = block(x)
            shapes.append(x.shape[2])
    return tuple(a // b for a, b in zip(shapes, shapes[1:]))


def _inversion_decoder(encoder: ModalityEncoder, image: torch.Tensor, levels: Sequence[int],
                       seed: int) -> FusionDecoder:
    """A fresh decoder from ``encoder``'s features on ``levels`` to one image channel: the Split-U-Net's own decoder
    layout (MONAI blocks, skip connections from ``levels``), its strides probed with ``image`` (1, 1, *S)."""
    strides = _level_strides(encoder, image)
    with _seeded(seed, image.device):
        return FusionDecoder(image.ndim - 2, 1, encoder.channels, strides, out_channels=1, levels=levels,
                             fusion="mean", full_res_channels=encoder.full_res_channels).to(image.device)


def train_inversion_decoder(encoder: ModalityEncoder, aux_images: torch.Tensor, levels: Sequence[int],
                            iterations: int = 300, lr: float = 2e-3, batch_size: int = 2, seed: int = 0,
                            release: Callable[[Features], Features] | None = None) -> FusionDecoder:
    """Train a decoder from the encoder's features on ``levels`` back to its input.

    The attacker queries the site's encoder (weights unseen, ``encoder`` only evaluated) on auxiliary
    images of the same modality and fits the decoder with MSE. The decoder is the Split-U-Net's own
    decoder layout (MONAI blocks, skip connections from ``levels``) with one input and one output channel.

    Args:
        encoder: the site's encoder (query access).
        aux_images: (N, 1, *S) auxiliary images, z-scored like the site's.
        levels: the observed levels; must include the encoder's bottleneck.
        iterations, lr, batch_size: Adam steps, step size and mini-batch size.
        seed: decoder initialisation and mini-batch sampling.
        release: what the site's filters do to its features before they leave (e.g. ``ActivationClipNoise.protect``:
            clipping and fresh noise), applied to every mini-batch: an attacker who knows the mechanism (the job
            names it) trains on features as they arrive, not on clean ones. None: the features are sent as computed.

    Returns:
        The trained decoder, in eval mode, on the encoder's device: see ``learned_inversion``.
    """
    device = _device(encoder)
    images = aux_images.to(device=device, dtype=torch.float32)
    levels = tuple(sorted(int(level) for level in levels))
    with _frozen(encoder), torch.no_grad():
        # The encoder is fixed: query it once per image instead of once per step.
        features = {level: t for level, t in encoder(images).items() if level in levels}
    decoder = _inversion_decoder(encoder, images[:1], levels, seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    decoder.train()
    for _ in range(iterations):
        index = torch.randperm(len(images), generator=generator)[:batch_size].to(device)
        optimizer.zero_grad(set_to_none=True)
        batch = {level: t[index] for level, t in features.items()}
        prediction = decoder([batch if release is None else release(batch)])
        F.mse_loss(prediction, images[index]).backward()
        optimizer.step()
    return decoder.eval()


@torch.no_grad()
def learned_inversion(decoder: FusionDecoder, activations: Features) -> torch.Tensor:
    """Reconstruct (B, 1, *S) images from activations ``{level: (B, C_l, *S_l)}`` with a trained decoder."""
    decoder.eval()
    targets = _targets(activations, _device(decoder))
    return decoder([{level: targets[level] for level in decoder.levels}])


def train_surrogate_autoencoder(make_encoder: Callable[[], ModalityEncoder], aux_images: torch.Tensor,
                                levels: Sequence[int], iterations: int = 100, lr: float = 2e-3, batch_size: int = 2,
                                seed: int = 0, device: torch.device | str | None = None
                                ) -> tuple[ModalityEncoder, FusionDecoder]:
    """The attacker's own encoder of the site's architecture and a decoder that inverts it, without the site.

    Both are trained together as an autoencoder (MSE) on auxiliary images of the site's modality, as the
    pilot pair of a feature-space hijacking (Pasquini et al. 2021) is; the site is never asked anything.

    Args:
        make_encoder: builds an encoder of the site's architecture (re-initialised from ``seed``).
        aux_images: (N, 1, *S) auxiliary images, z-scored like the site's.
        levels: the observed levels; must include the bottleneck.
        iterations, lr, batch_size: Adam steps, step size and mini-batch size.
        seed: initialisation and mini-batch sampling.
        device: where to run (default: CUDA when present).

    Returns:
        (surrogate encoder, surrogate decoder), both in eval mode: see ``surrogate_inversion``.
    """
    device = _attack_device(device)
    images = aux_images.to(device=device, dtype=torch.float32)
    levels = tuple(sorted(int(level) for level in levels))
    encoder = _fresh_encoder(make_encoder, seed, device)
    decoder = _inversion_decoder(encoder, images[:1], levels, seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    encoder.train()
    decoder.train()
    for _ in range(iterations):
        batch = images[torch.randperm(len(images), generator=generator)[:batch_size].to(device)]
        optimizer.zero_grad(set_to_none=True)
        features = {level: t for level, t in encoder(batch).items() if level in levels}
        F.mse_loss(decoder([features]), batch).backward()
        optimizer.step()
    return encoder.eval(), decoder.eval()


def train_completion_encoders(make_encoder: Callable[[], ModalityEncoder], decoder: FusionDecoder,
                              aux_images: torch.Tensor, aux_target: torch.Tensor, loss: nn.Module,
                              iterations: int = 100, lr: float = 2e-3, batch_size: int = 2, seed: int = 0,
                              device: torch.device | str | None = None) -> list[ModalityEncoder]:
    """Model completion (Fu et al. 2022, "Label inference attacks against vertical federated learning"): the server's
    trained decoder, frozen, completed with surrogate encoders trained through it on labelled auxiliary patients.

    One fresh encoder of the sites' architecture per decoder input is trained, all together, so that the frozen
    decoder segments the auxiliary patients from their features (``loss``, the job's segmentation loss): the only way
    to do so is to speak the decoder's language, which is the sites' feature spaces, up to what the decoder ignores.
    No site is asked anything; the decoder is the server's own.

    Args:
        make_encoder: builds an encoder of the sites' architecture (re-initialised from ``seed`` + its input index).
        decoder: the server's trained decoder (left unchanged).
        aux_images: (N, K, *S) auxiliary patients' images, one channel per decoder input, z-scored like the sites'.
        aux_target: (N, C, *S) their region masks (the decoder's output channels).
        loss: ``loss(logits, target)``, e.g. ``training.objective.segmentation_loss()``.
        iterations, lr, batch_size: Adam steps, step size and mini-batch size.
        seed: initialisation and mini-batch sampling.
        device: where to run (default: CUDA when present).

    Returns:
        K encoders in eval mode, in the decoder's input order.
    """
    device = _attack_device(device)
    images = aux_images.to(device=device, dtype=torch.float32)
    target = aux_target.to(device=device, dtype=torch.float32)
    if images.shape[1] != decoder.num_inputs:
        raise ValueError(f"the decoder takes {decoder.num_inputs} inputs, the auxiliary images have {images.shape[1]}")
    encoders = [_fresh_encoder(make_encoder, seed + index, device).train() for index in range(images.shape[1])]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for encoder in encoders for p in encoder.parameters()], lr=lr)
    decoder = decoder.to(device)
    with _frozen(decoder):
        for _ in range(iterations):
            index = torch.randperm(len(images), generator=generator)[:batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            features = [{level: t for level, t in encoder(images[index, k:k + 1]).items() if level in decoder.levels}
                        for k, encoder in enumerate(encoders)]
            loss(decoder(features), target[index]).backward()
            optimizer.step()
    return [encoder.eval() for encoder in encoders]


def _channel_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and covariance (C, C) of a level's channels over every sample and voxel of (B, C, *S_l)."""
    channels = features.shape[1]
    flat = features.transpose(0, 1).reshape(channels, -1).double()
    # torch.cov gives a 0-d tensor for one channel (a narrowed full-resolution level): keep it (1, 1).
    return flat.mean(dim=1), torch.cov(flat, correction=0).reshape(channels, channels)


def _matrix_power(covariance: torch.Tensor, power: float, floor: float = 1e-6) -> torch.Tensor:
    """``covariance ** power`` of a symmetric PSD matrix; eigenvalues below ``floor`` x the largest are raised to it
    (a channel that is constant in the batch has no variance to whiten)."""
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(floor * values.max().clamp_min(1e-30))
    return vectors @ torch.diag(values.pow(power)) @ vectors.T


class FeatureAdaptor(nn.Module):
    """A 1x1x1 map per level from the site's feature space into the surrogate encoder's.

    Level ``l``: ``a = W_l f + b_l`` with ``W_l = Sigma_s^1/2 Q_l Sigma_t^-1/2`` and ``b_l = mu_s - W_l mu_t``,
    where (``mu_t``, ``Sigma_t``) are the channel mean and covariance of the site's features (the recorded
    batch) and (``mu_s``, ``Sigma_s``) the surrogate's (the auxiliary images), and ``Q_l = exp(K_l - K_l^T)`` is
    a rotation. At ``Q = I`` this is CORAL's closed-form alignment (Sun, Feng and Saenko 2016): whiten the
    site's channels, colour them with the surrogate's. Every ``Q`` matches the first two moments exactly, so the
    moment constraint costs no weight and cannot be traded away; only the rotation, which moments cannot fix
    (the site's channel order and mixing are arbitrary), is left to be learnt, from cycle consistency
    (``surrogate_inversion``).
    """

    def __init__(self, site: Features, surrogate: Features):
        super().__init__()
        self.levels = tuple(sorted(int(level) for level in site))
        self.generators = nn.ParameterDict()
        for level in self.levels:
            mu_t, sigma_t = _channel_moments(site[level])
            mu_s, sigma_s = _channel_moments(surrogate[level])
            self.register_buffer(f"whiten_{level}", _matrix_power(sigma_t, -0.5).float())
            self.register_buffer(f"colour_{level}", _matrix_power(sigma_s, 0.5).float())
            self.register_buffer(f"site_mean_{level}", mu_t.float())
            self.register_buffer(f"surrogate_mean_{level}", mu_s.float())
            self.generators[str(level)] = nn.Parameter(torch.zeros(len(mu_t), len(mu_t)))

    def rotation(self, level: int) -> torch.Tensor:
        generator = self.generators[str(level)]
        return torch.linalg.matrix_exp(generator - generator.T)

    def forward(self, features: Features) -> dict[int, torch.Tensor]:
        adapted = {}
        for level in self.levels:
            weight = getattr(self, f"colour_{level}") @ self.rotation(level) @ getattr(self, f"whiten_{level}")
            centred = features[level] - _channel_view(getattr(self, f"site_mean_{level}"), features[level])
            adapted[level] = (torch.einsum("oc,bc...->bo...", weight, centred)
                              + _channel_view(getattr(self, f"surrogate_mean_{level}"), features[level]))
        return adapted


def _channel_view(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) as (1, C, 1, ...) to broadcast over ``like`` (B, C, *S_l)."""
    return vector.view(1, -1, *[1] * (like.ndim - 2))


def surrogate_inversion(encoder: ModalityEncoder, decoder: FusionDecoder, aux_images: torch.Tensor,
                        activations: Features, iterations: int = 50, lr: float = 0.05) -> torch.Tensor:
    """Reconstruct from a site's activations with the attacker's surrogate pair (``train_surrogate_autoencoder``).

    The site's features live in a space of their own (its channel order and mixing are arbitrary), so a
    ``FeatureAdaptor`` per level maps them into the surrogate encoder's, fitted on the recorded activations
    alone, unsupervised: its first two moments match the surrogate's on ``aux_images`` by construction
    (CORAL), and its rotations minimise the cycle loss ``surrogate_encoder(decoder(adapted)) ~ adapted``
    (``_matching_loss``), the cycle consistency of CycleGAN (Zhu et al. 2017) between feature and image space:
    features the surrogate pair maps back onto themselves are features of some image it can invert. Adam on
    the rotations' generators, from ``Q = I``: nothing is drawn at random here (the pair's training is seeded).
    The site's encoder is never used.

    Args:
        encoder, decoder: the surrogate pair (left unchanged).
        aux_images: (N, 1, *S) the auxiliary images the pair was trained on (the surrogate's feature moments).
        activations: ``{level: (B, C_l, *S_l)}`` as recorded, the levels the decoder takes.
        iterations, lr: Adam steps and step size on the rotations.

    Returns:
        (B, 1, *S) reconstruction on the decoder's device. Its sign is arbitrary, as UnSplit's is: score it
        sign-invariantly.
    """
    device = _device(decoder)
    targets = {level: t for level, t in _targets(activations, device).items() if level in decoder.levels}
    with _frozen(encoder), _frozen(decoder):
        with torch.no_grad():
            reference = encoder(aux_images.to(device=device, dtype=torch.float32))
        adaptor = FeatureAdaptor(targets, {level: reference[level] for level in targets}).to(device)
        optimizer = torch.optim.Adam(adaptor.parameters(), lr=lr)
        for _ in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            adapted = adaptor(targets)
            _matching_loss(encoder(decoder([adapted])), adapted).backward()
            optimizer.step()
        with torch.no_grad():
            return decoder([adaptor(targets)])


def gradient_magnitude(gradients: Features, image_shape: Sequence[int], level: int | None = None) -> torch.Tensor:
    """Per-voxel L2 norm over channels of one level's gradient, upsampled to ``S``: (B, *S).

    ``level`` defaults to the finest received level.
    """
    level = min(gradients) if level is None else level
    gradient = torch.as_tensor(gradients[level], dtype=torch.float32)
    magnitude = gradient.pow(2).sum(dim=1, keepdim=True).sqrt()
    if tuple(magnitude.shape[2:]) != tuple(image_shape):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(image_shape)]
        magnitude = F.interpolate(magnitude, size=tuple(image_shape), mode=mode, align_corners=False)
    return magnitude[:, 0]


def gradient_label_leakage(gradients: Features, image_shape: Sequence[int], level: int | None = None) -> torch.Tensor:
    """Estimate the tumour mask of each sample from the gradients a site received.

    The decoder's loss marks the tumour in its gradient: the Dice term adds a gradient at voxels labelled
    tumour that background voxels do not get, and once the decoder predicts mostly background the
    cross-entropy's ``|p - t|`` is largest there too. The gradient's magnitude (``gradient_magnitude``)
    is thresholded per sample with Otsu's method (scikit-image ``threshold_otsu``); the voxels above the
    threshold are the estimate.

    Args:
        gradients: ``{level: (B, C_l, *S_l)}``, d loss / d activations as sent back to the site.
        image_shape: ``S``.
        level: the level to read (default: the finest received one).

    Returns:
        (B, *S) bool masks, on the CPU.
    """
    magnitude = gradient_magnitude(gradients, image_shape, level).cpu().numpy()
    # A constant map (no gradient) has no threshold: Otsu returns its value, so the mask is empty.
    masks = [m > threshold_otsu(m) for m in magnitude]
    return torch.from_numpy(np.stack(masks))


def random_mask_like(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Chance baseline: per sample, a uniformly random mask with as many voxels as ``mask`` (B, *S) has."""
    generator = torch.Generator().manual_seed(seed)
    flat = mask.reshape(mask.shape[0], -1).cpu()
    out = torch.zeros_like(flat, dtype=torch.bool)
    for row, count in zip(out, flat.sum(dim=1).tolist()):
        row[torch.randperm(row.numel(), generator=generator)[:int(count)]] = True
    return out.reshape(mask.shape)

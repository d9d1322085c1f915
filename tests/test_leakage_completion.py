"""Model completion: surrogate encoders trained through the server's frozen decoder, on a tiny phantom (16^3)."""

import pytest
import torch
from helpers import make_dataset

from split_unet.data import MODALITIES, SiteImages, SiteLabels
from split_unet.leakage.attacks import train_completion_encoders
from split_unet.networks import ModalityEncoder, NetworkConfig, build_decoder, build_encoder
from split_unet.training import DecoderParty, EncoderParty, segmentation_loss

pytestmark = pytest.mark.unit

SIZE = 16
CONFIG = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), levels=(1, 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(server's decoder after 30 steps of split learning, images (N, 4, *S), regions (N, 3, *S)) of 6 patients."""
    _, sites = make_dataset(tmp_path_factory.mktemp("completion"), patients=6, size=SIZE)
    ids = SiteImages(sites / "flair", SIZE).patient_ids
    images = torch.cat([torch.from_numpy(SiteImages(sites / m, SIZE).batch(ids)) for m in MODALITIES], dim=1)
    target = torch.from_numpy(SiteLabels(sites / "server", SIZE).batch(ids)).float()
    device = torch.device("cpu")
    parties = [EncoderParty(build_encoder(CONFIG, k, seed=0), 1e-2, device, m) for k, m in enumerate(MODALITIES)]
    server = DecoderParty(build_decoder(CONFIG, len(MODALITIES), seed=0), 1e-2, device)
    for step in range(30):
        batch = [step % 6, (step + 1) % 6]
        features = [party.forward(images[batch, k:k + 1]) for k, party in enumerate(parties)]
        _, gradients = server.train_step(features, target[batch])
        for party, gradient in zip(parties, gradients):
            party.backward(gradient)
    return server.decoder, images, target


def _loss(decoder, encoders, images, target) -> float:
    with torch.no_grad():
        features = [{level: t for level, t in encoder(images[:, k:k + 1]).items() if level in decoder.levels}
                    for k, encoder in enumerate(encoders)]
        return float(segmentation_loss()(decoder.eval()(features), target))


def test_surrogate_encoders_learn_to_speak_to_the_frozen_decoder(trained):
    decoder, images, target = trained
    before = {name: value.clone() for name, value in decoder.state_dict().items()}
    flags = [p.requires_grad for p in decoder.parameters()]

    def make_encoder() -> ModalityEncoder:
        return ModalityEncoder(3, 1, **CONFIG.encoder_args())

    untrained = train_completion_encoders(make_encoder, decoder, images, target, segmentation_loss(), iterations=0)
    completed = train_completion_encoders(make_encoder, decoder, images, target, segmentation_loss(), iterations=40,
                                          lr=5e-3)
    assert len(completed) == len(MODALITIES) and not any(encoder.training for encoder in completed)
    # Through the decoder the server trained, its own encoders segment the auxiliary patients far better than fresh
    # ones: their features are what the decoder reads.
    # (Measured: 0.77 against 0.96 after 40 steps; the decoder's own sites reach about 0.7 after 30.)
    assert _loss(decoder, completed, images, target) < 0.9 * _loss(decoder, untrained, images, target)
    # The server's decoder is left as it was, weights and flags.
    assert all(torch.equal(before[name], value) for name, value in decoder.state_dict().items())
    assert [p.requires_grad for p in decoder.parameters()] == flags
    # Deterministic for a seed.
    once, again = (train_completion_encoders(make_encoder, decoder, images, target, segmentation_loss(), iterations=3)
                   for _ in range(2))
    assert all(torch.equal(a, b) for x, y in zip(once, again)
               for a, b in zip(x.state_dict().values(), y.state_dict().values()))


def test_completion_needs_one_image_channel_per_decoder_input(trained):
    decoder, images, target = trained
    with pytest.raises(ValueError, match="4 inputs"):
        train_completion_encoders(lambda: ModalityEncoder(3, 1, **CONFIG.encoder_args()), decoder, images[:, :2],
                                  target, segmentation_loss(), iterations=1)

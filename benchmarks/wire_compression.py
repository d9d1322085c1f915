"""Does lossless compression of the float16 payload pay? Ratio and thread CPU of compressing and decompressing
the bytes that one training step really sends.

The payload is made by the project's own parties on phantom patients (skull-stripped: exactly 0 outside the
brain, normalised inside it as the readers do): four sites' ``EncoderParty`` -> float16 activations, the
server's ``DecoderParty`` -> float16 gradients, at initialisation and after ``--steps`` training steps.
Compressors: zlib (stdlib) and zstandard (``pip install zstandard``; skipped if absent), each on the bytes as
sent and after a byte shuffle (the float16 values' low and high bytes as two planes, as Blosc and HDF5 do:
the exponent bytes compress, the mantissa bytes hardly). A compressor pays only if the messaging CPU it saves
(``--mb-per-cpu-second``: NVFlare's measured rate per byte, ``docs/performance.md``) exceeds what it costs on both ends.

    python benchmarks/wire_compression.py --out docs/performance/wire_compression
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_numpy
from wire_micro import cpu_ms  # thread CPU per call, after one unmeasured call

from split_unet.data.phantom import generate_patient
from split_unet.data.regions import regions
from split_unet.networks import NetworkConfig, build_decoder, build_encoder
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage
from split_unet.training.parties import DecoderParty, EncoderParty

try:  # optional: measured when installed, never a dependency of the package
    import zstandard
except ImportError:
    zstandard = None

SIZE, BATCH, SITES = 64, 2, 4


def shuffle(data: bytes) -> bytes:
    """float16 bytes -> all low bytes, then all high bytes."""
    return np.frombuffer(data, np.uint8).reshape(-1, 2).T.tobytes()


def unshuffle(data: bytes) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(2, -1).T.tobytes()


def compressors() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    found = {"zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress),
             "zlib-6": (lambda b: zlib.compress(b, 6), zlib.decompress)}
    if zstandard is not None:
        for level in (1, 3):
            compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            found[f"zstd-{level}"] = (compressor.compress, decompressor.decompress)
    for name, (pack, unpack) in list(found.items()):
        found[f"{name}+shuffle"] = (lambda b, pack=pack: pack(shuffle(b)), lambda b, unpack=unpack: unshuffle(unpack(b)))
    return found


def payloads(steps: int, seed: int) -> dict[str, list[bytes]]:
    """{"activations at step k": the byte fields of the four sites' messages, "gradients at step k": ...}."""
    cases = [generate_patient(index, SIZE, seed) for index in range(BATCH)]
    # The readers' normalisation: per volume and modality, brain voxels only; the background stays exactly 0.
    normalize = NormalizeIntensity(nonzero=True, channel_wise=True)
    images = np.stack([convert_to_numpy(normalize(np.moveaxis(image, -1, 0)), dtype=np.float32)
                       for image, _ in cases])  # (B, 4, *S)
    target = np.stack([regions(label) for _, label in cases]).astype(np.float32)
    config = NetworkConfig()
    device = torch.device("cpu")
    encoders = [EncoderParty(build_encoder(config, k, seed), 1e-3, device) for k in range(SITES)]
    decoder = DecoderParty(build_decoder(config, SITES, seed), 1e-3, device)
    found = {}
    for step in range(steps + 1):
        features = [party.forward(images[:, k:k + 1]) for k, party in enumerate(encoders)]
        loss, gradients = decoder.train_step(features, target)
        if step in (0, steps):
            for kind, tensors in ((KIND_ACTIVATIONS, features), (KIND_REQUEST, gradients)):
                name = f"{'activations' if kind == KIND_ACTIVATIONS else 'gradients'} after {step} steps"
                found[name] = [value for site in tensors for value in
                               TensorMessage(kind, step, ["P"], site).to_dxo("float16")[0].data.values()]
            print(f"step {step}: loss {loss:.3f}", flush=True)
        for party, gradient in zip(encoders, gradients):
            party.backward(gradient)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json")
    parser.add_argument("--steps", type=int, default=20, help="training steps before the second measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mb-per-cpu-second", type=float, default=80.0,
                        help="NVFlare's messaging CPU per byte, both ends together (docs/performance.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name, fields in payloads(args.steps, args.seed).items():
        total = sum(len(f) for f in fields)
        for codec, (pack, unpack) in compressors().items():
            packed = [pack(f) for f in fields]
            assert all(unpack(p) == f for p, f in zip(packed, fields)), codec  # lossless, checked
            cost = cpu_ms(lambda: [pack(f) for f in fields], args.repeats) + \
                cpu_ms(lambda: [unpack(p) for p in packed], args.repeats)
            size = sum(len(p) for p in packed)
            saved_ms = (total - size) / 1e6 / args.mb_per_cpu_second * 1e3
            results.append({"payload": name, "compressor": codec, "mb": total / 1e6, "ratio": size / total,
                            "cpu_ms_both_ends": cost, "messaging_cpu_ms_saved": saved_ms,
                            "net_cpu_ms_saved": saved_ms - cost})
            row = results[-1]
            print(f"{name:28s} {codec:18s} {row['mb']:6.1f} MB  ratio {row['ratio']:.3f}  "
                  f"cost {cost:7.1f} ms  saved {saved_ms:7.1f} ms  net {row['net_cpu_ms_saved']:+7.1f} ms", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"size": SIZE, "batch": BATCH, "sites": SITES, "steps": args.steps,
         "mb_per_cpu_second": args.mb_per_cpu_second, "zstandard": getattr(zstandard, "__version__", None),
         "results": results}, indent=2))


if __name__ == "__main__":
    main()

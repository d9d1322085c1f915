"""CPU of the wire path inside one process, stage by stage, against the payload size: encode (codecs), FOBS
serialisation and deserialisation as NVFlare's cells do it (``fobs.dumps(..., buffer_list=True)``), and the
checked decode. Raw bytes (the wire format) against the same tensors as numpy arrays (the format before, which
FOBS serialises with ``np.save``/``np.load`` when it has no cell; with a cell it sends them through its download
service, which this in-process measurement cannot show). Thread CPU time, one thread: the other processes of a
busy machine change it little.

    python benchmarks/wire_micro.py --out docs/performance/wire_micro
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from nvflare.apis.dxo import DXO  # noqa: E402
from nvflare.app_common.decomposers import numpy_decomposers  # noqa: E402
from nvflare.fuel.utils import fobs  # noqa: E402

from split_unet.protocol.codecs import DTYPES  # noqa: E402
from split_unet.protocol.wire import KIND_ACTIVATIONS, TensorMessage  # noqa: E402

WIDTHS = ((2, 4, 8, 16), (4, 8, 16, 32), (8, 16, 32, 64), (16, 32, 64, 128), (32, 64, 128, 256))
SIZE, BATCH = 64, 2


def cpu_ms(function, repeats: int) -> float:
    function()
    started = time.thread_time()
    for _ in range(repeats):
        function()
    return (time.thread_time() - started) / repeats * 1e3


def measure(channels: tuple[int, ...], codec: str, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    tensors = {level: torch.randn(BATCH, c, *(SIZE >> level,) * 3, generator=generator)
               for level, c in enumerate(channels)}
    message = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], tensors)
    shareable, n_bytes = message.to_shareable(codec)
    buffers = fobs.dumps(shareable, buffer_list=True)
    received = b"".join(buffers)
    dxo = shareable["DXO"]
    as_arrays = DXO(KIND_ACTIVATIONS, data={key: np.frombuffer(value, DTYPES[codec]) for key, value in
                                            dxo["data"].items()}, meta=dxo["meta"]).to_shareable()
    arrays_received = b"".join(fobs.dumps(as_arrays, buffer_list=True))
    stages = {
        "encode": cpu_ms(lambda: message.to_shareable(codec), repeats),
        "FOBS serialise": cpu_ms(lambda: fobs.dumps(shareable, buffer_list=True), repeats),
        "FOBS deserialise": cpu_ms(lambda: fobs.loads(received), repeats),
        "decode and checks": cpu_ms(lambda: TensorMessage.from_shareable(shareable, KIND_ACTIVATIONS, site="s"),
                                    repeats),
    }
    numpy_fobs = {"FOBS serialise": cpu_ms(lambda: fobs.dumps(as_arrays, buffer_list=True), repeats),
                  "FOBS deserialise": cpu_ms(lambda: fobs.loads(arrays_received), repeats)}
    total = sum(stages.values())
    return {"channels": list(channels), "megabytes": n_bytes / 1e6, "cpu_ms": stages, "numpy_fobs_cpu_ms": numpy_fobs,
            "mb_per_cpu_second": n_bytes / 1e6 / (total / 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    parser.add_argument("--codec", default="float16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    numpy_decomposers.register()
    points = [measure(channels, args.codec, args.repeats) for channels in WIDTHS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2))
    for point in points:
        print(f"{point['megabytes']:8.1f} MB  " + "  ".join(f"{k} {v:7.1f} ms" for k, v in point["cpu_ms"].items())
              + "  | numpy FOBS: " + "  ".join(f"{k} {v:7.1f} ms" for k, v in point["numpy_fobs_cpu_ms"].items())
              + f"  | {point['mb_per_cpu_second']:.0f} MB per CPU s")
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p["megabytes"] for p in points], [p["mb_per_cpu_second"] for p in points], "o-",
              label="encode + FOBS both ways + decode (one message)")
    axis.axhline(450, color="grey", linestyle="--", label="target for the whole federation")
    axis.set(xscale="log", xlabel="tensor MB per message", ylabel="MB per CPU second",
             title=f"Wire path in one process ({args.codec}, {SIZE}^3, batch {BATCH})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

"""What glibc's mmap threshold costs the arithmetic of one training step, in one process, no federation.

    python benchmarks/allocator_cost.py --out docs/performance/allocator_cost.json

Each configuration runs in a child process of its own (the threshold is set once per process and cannot be
undone): the four encoders' forward passes, the decoder's step and the encoders' backward passes of one 64^3
step (batch 2, the default network), ``--steps`` times, with 1 and 2 torch threads. ``default`` is glibc as it
is; ``mmap_1mib`` fixes the threshold at 1 MiB, as ``split_unet.allocator`` did from session 6 until it was
removed: every tensor of 1 MiB and more is then a fresh mapping, faulted in page by page and unmapped when freed.
The first step of each thread count is left out (allocation, caches). Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import ctypes, ctypes.util, json, resource, sys, time
import numpy as np, torch
from split_unet.networks import build_decoder, build_encoder
from split_unet.training import TrainConfig
from split_unet.training.parties import DecoderParty, EncoderParty

mode, steps = sys.argv[1], int(sys.argv[2])
if mode == "mmap_1mib":
    assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
net = TrainConfig.from_dict({"size": 64}).network
rng = np.random.default_rng(0)
images = rng.random((2, 1, 64, 64, 64), dtype=np.float32)
masks = (rng.random((2, 3, 64, 64, 64)) > 0.5).astype(np.float32)
result = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    encoders = [EncoderParty(build_encoder(net, k, 0), 1e-3, torch.device("cpu")) for k in range(4)]
    decoder = DecoderParty(build_decoder(net, 4, 0), 1e-3, torch.device("cpu"))
    rows = []
    for _ in range(steps + 1):
        cpu, t0 = time.process_time(), time.perf_counter()
        features = [encoder.forward(images) for encoder in encoders]
        t1 = time.perf_counter()
        _, gradients = decoder.train_step(features, masks)
        t2 = time.perf_counter()
        for encoder, gradient in zip(encoders, gradients):
            encoder.backward(gradient)
        t3 = time.perf_counter()
        rows.append([t1 - t0, t2 - t1, t3 - t2, t3 - t0, time.process_time() - cpu])
    kept = np.median(np.array(rows[1:]), axis=0)
    result[threads] = dict(zip(("encoders_forward_s", "decoder_step_s", "encoders_backward_s", "step_s",
                                "step_cpu_s"), (round(float(x), 3) for x in kept)))
usage = resource.getrusage(resource.RUSAGE_SELF)
result["process"] = {"user_s": round(usage.ru_utime, 1), "system_s": round(usage.ru_stime, 1)}
print(json.dumps(result))
"""


def measure(mode: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    results = {mode: measure(mode, args.steps) for mode in ("default", "mmap_1mib")}
    print("| threads | allocator | encoders forward s | decoder step s | encoders backward s | step s | step CPU s |")
    print("|---|---|---|---|---|---|---|")
    for threads in ("1", "2"):
        for mode, result in results.items():
            row = result[threads]
            print(f"| {threads} | {mode} | " + " | ".join(f"{value:.3f}" for value in row.values()) + " |")
        slow, fast = results["mmap_1mib"][threads]["step_s"], results["default"][threads]["step_s"]
        print(f"| {threads} | ratio | | | | {slow / fast:.2f} | |")
    for mode, result in results.items():
        print(f"{mode}: whole process {result['process']['user_s']} s user, {result['process']['system_s']} s system")
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

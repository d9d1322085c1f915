"""The floor under the federation's step: the same split step with every part of the project and no NVFlare messaging.

    python benchmarks/split_floor.py --out docs/performance/split_floor.json

Two modes run in one invocation on the bench's shapes (64^3, batch 2, channels 8-16-32-64, four sites, float16):

- ``centralized``: one process with the cores' threads, as ``split-unet centralized``: the four encoders' forward
  passes, the decoder's step, the encoders' backward passes.
- ``split``: the server in this process (all the cores' threads) and each site in a process of its own (the cores
  shared among the sites, as the bench sets them). Each step is the federation's round: the server sends every site
  the gradient of its previous activations; the site decodes it, steps its encoder, runs the next batch forward and
  answers with its activations; the server decodes them, steps the decoder and encodes the gradients. Messages are
  the project's own (``TensorMessage`` to a Shareable, FOBS bytes) over a local pipe. What is missing against the
  bench is NVFlare's messaging only: task polling, cellnet streaming, events, filters and the task check.

Random images and masks (the data's loading is not part of either); the first step of each mode is left out. Prints
per mode the median step and its parts, the CPU seconds per step of all processes, and the split's ratio to
centralized: the step a perfect transport would give, and the CPU it would cost, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.fuel.utils import fobs

from split_unet.launch.benchmark import BenchConfig, site_threads
from split_unet.networks import NetworkConfig, build_decoder, build_encoder
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage
from split_unet.training.parties import DecoderParty, EncoderParty

BENCH = BenchConfig()  # the bench's shapes, network and wire codec
SITES, BATCH, SIZE, WIRE = BENCH.sites, BENCH.batch_size, BENCH.size, BENCH.wire_dtype
CPU = torch.device("cpu")


def network() -> NetworkConfig:
    return NetworkConfig.from_dict(BENCH.train()["network"])


def images(index: int) -> np.ndarray:
    return np.random.default_rng(index).random((BATCH, 1, SIZE, SIZE, SIZE), dtype=np.float32)


def masks() -> np.ndarray:
    return (np.random.default_rng(SITES).random((BATCH, 3, SIZE, SIZE, SIZE)) > 0.5).astype(np.float32)


def centralized(steps: int, threads: int, queue: mp.Queue) -> None:
    """One process: per step the four encoders forward, the decoder's step, the encoders backward."""
    torch.set_num_threads(threads)
    encoders = [EncoderParty(build_encoder(network(), k, 0), 1e-3, CPU) for k in range(SITES)]
    decoder = DecoderParty(build_decoder(network(), SITES, 0), 1e-3, CPU)
    inputs, target, rows = [images(k) for k in range(SITES)], masks(), []
    for _ in range(steps + 1):
        cpu, start = time.process_time(), time.perf_counter()
        features = [encoder.forward(x) for encoder, x in zip(encoders, inputs)]
        _, gradients = decoder.train_step(features, target)
        for encoder, gradient in zip(encoders, gradients):
            encoder.backward(gradient)
        rows.append((time.perf_counter() - start, time.process_time() - cpu))
    queue.put(rows[1:])


def site(index: int, threads: int, connection) -> None:
    """A site's task loop: gradient in (FOBS bytes), encoder step, next batch forward, activations out."""
    torch.set_num_threads(threads)
    party, inputs = EncoderParty(build_encoder(network(), index, 0), 1e-3, CPU), images(index)
    while data := connection.recv_bytes():
        start = time.perf_counter()
        task = TensorMessage.from_shareable(fobs.loads(data), KIND_REQUEST, site=f"site{index}")
        if task.tensors:
            party.backward(task.tensors)
        features = party.forward(inputs)
        busy = time.perf_counter() - start  # as the executor's busy_seconds: up to the reply's encoding
        shareable, _ = TensorMessage(KIND_ACTIVATIONS, task.step, task.patient_ids, features).to_shareable(WIRE)
        connection.send_bytes(fobs.dumps(shareable))
        connection.send((busy, time.process_time()))


def split(steps: int, threads: int, site_threads: int) -> list[dict]:
    """The server's rounds against ``SITES`` site processes; per step: wall, decoder, slowest site, all CPU."""
    torch.set_num_threads(threads)
    context = mp.get_context("spawn")
    pipes = [context.Pipe() for _ in range(SITES)]
    workers = [context.Process(target=site, args=(k, site_threads, pipes[k][1]), daemon=True) for k in range(SITES)]
    for worker in workers:
        worker.start()
    decoder, target = DecoderParty(build_decoder(network(), SITES, 0), 1e-3, CPU), masks()
    gradients: list[dict] = [{} for _ in range(SITES)]
    rows = []
    try:
        for step in range(steps + 2):  # the first round only starts the sites' models
            start, cpu = time.perf_counter(), time.process_time()
            for k, (server_end, _) in enumerate(pipes):
                task, _ = TensorMessage(KIND_REQUEST, step, [f"p{step}"], gradients[k],
                                        tensor_step=step - 1).to_shareable(WIRE)
                server_end.send_bytes(fobs.dumps(task))
            replies, times = [], []
            for k, (server_end, _) in enumerate(pipes):
                data = server_end.recv_bytes()
                replies.append(TensorMessage.from_shareable(fobs.loads(data), KIND_ACTIVATIONS, site=f"site{k}"))
                times.append(server_end.recv())
            received = time.perf_counter()
            _, gradients = decoder.train_step([reply.tensors for reply in replies], target)
            rows.append({"step_s": time.perf_counter() - start, "decoder_s": time.perf_counter() - received,
                         "slowest_site_s": max(busy for busy, _ in times), "server_cpu_s": time.process_time() - cpu,
                         "site_cpu_total_s": sum(cpu for _, cpu in times)})
    finally:
        for server_end, _ in pipes:
            server_end.send_bytes(b"")
        for worker in workers:
            worker.join(timeout=30)
    # Sites report their cumulative CPU: per step, the difference to the previous round's.
    for previous, row in zip(rows, rows[1:]):
        row["cpu_s"] = row["server_cpu_s"] + row["site_cpu_total_s"] - previous["site_cpu_total_s"]
    return rows[2:]  # without the start-up round and the first step


def median(rows: list[dict], key: str) -> float:
    return round(float(np.median([row[key] for row in rows])), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads_per_site = site_threads(SITES)
    queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=centralized, args=(args.steps, cores, queue))
    child.start()
    central = [{"step_s": wall, "cpu_s": cpu} for wall, cpu in queue.get()]
    child.join()
    rows = split(args.steps, cores, threads_per_site)
    result = {
        "steps": args.steps, "cores": cores, "site_threads": threads_per_site,
        "centralized": {"step_s": median(central, "step_s"), "cpu_s": median(central, "cpu_s")},
        "split": {key: median(rows, key) for key in ("step_s", "decoder_s", "slowest_site_s", "cpu_s")},
    }
    split_row, central_row = result["split"], result["centralized"]
    split_row["neither_s"] = round(split_row["step_s"] - split_row["decoder_s"] - split_row["slowest_site_s"], 3)
    result["ratio"] = round(split_row["step_s"] / central_row["step_s"], 3)
    result["federation_cpu_s"] = round(split_row["cpu_s"] - central_row["cpu_s"], 3)
    print(f"centralized: {central_row['step_s']:.3f} s/step, {central_row['cpu_s']:.2f} CPU s/step")
    print(f"split, no NVFlare messaging: {split_row['step_s']:.3f} s/step ({result['ratio']:.2f}x centralized), "
          f"{split_row['cpu_s']:.2f} CPU s/step (federation {result['federation_cpu_s']:+.2f}); decoder "
          f"{split_row['decoder_s']:.3f}, slowest site {split_row['slowest_site_s']:.3f}, neither "
          f"{split_row['neither_s']:.3f} s")
    if args.out:
        args.out.write_text(json.dumps({**result, "per_step": {"centralized": central, "split": rows}},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()

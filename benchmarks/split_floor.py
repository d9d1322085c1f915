"""The floor under the federation's step: the same split step with every part of the project and no NVFlare messaging.

    python benchmarks/split_floor.py --out docs/performance/split_floor.json

Three modes run in one invocation on the bench's shapes (64^3, batch 2, channels 8-16-32-64, four sites, float16):

- ``centralized``: one process with the cores' threads, as ``split-unet centralized`` trains (``CentralizedTrainer``):
  the whole network's forward pass, loss, one backward pass, one optimiser step.
- ``parties``: the same arithmetic cut where the split job cuts it, still in one process: the four
  ``EncoderParty`` forward passes, the ``DecoderParty`` step (its own leaves, backward pass and optimiser), the
  encoders' backward passes. What cutting the network costs before any process or message.
- ``split``: the server in this process (all the cores' threads) and each site in a process of its own (the cores
  shared among the sites, as the bench sets them). Each step is the federation's round: the server sends every site
  the gradient of its previous activations, all sites at once (a thread each, as the pushed route sends them);
  the site decodes it, steps its encoder, runs the next batch forward and
  answers with its activations; the server decodes them, steps the decoder and encodes the gradients. Messages are
  the project's own (``TensorMessage`` to a Shareable, FOBS bytes) over a local pipe. What is missing against the
  bench is NVFlare's messaging only: task polling, cellnet streaming, events, filters and the task check.

Random images and masks (the data's loading is not part of any); the first step of each mode is left out. Prints
per mode the median step and its parts, the CPU seconds per step of all processes, and each mode's ratio to
centralized: the step a perfect transport would give, and the CPU it would cost, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.fuel.utils import fobs

from split_unet.launch.allocator import tune_this_process, tuned_environment
from split_unet.launch.benchmark import BenchConfig, site_threads
from split_unet.networks import NetworkConfig, build_decoder, build_encoder, build_split_unet
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage
from split_unet.training.centralized import CentralizedTrainer
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
    """One process, the whole network: per step one forward pass, one backward pass, one optimiser step."""
    torch.set_num_threads(threads)
    trainer = CentralizedTrainer(build_split_unet(network(), (1,) * SITES, 0), 1e-3, CPU)
    inputs, target = torch.from_numpy(np.concatenate([images(k) for k in range(SITES)], axis=1)), \
        torch.from_numpy(masks())
    queue.put(timed_steps(steps, lambda: trainer.train_step(inputs, target)))


def parties(steps: int, threads: int, queue: mp.Queue) -> None:
    """One process, the network cut as the split job cuts it: per step the four encoders forward, the decoder's
    step, the encoders backward."""
    torch.set_num_threads(threads)
    encoders = [EncoderParty(build_encoder(network(), k, 0), 1e-3, CPU) for k in range(SITES)]
    decoder = DecoderParty(build_decoder(network(), SITES, 0), 1e-3, CPU)
    inputs, target = [images(k) for k in range(SITES)], masks()

    def step() -> None:
        features = [encoder.forward(x) for encoder, x in zip(encoders, inputs)]
        _, gradients = decoder.train_step(features, target)
        for encoder, gradient in zip(encoders, gradients):
            encoder.backward(gradient)

    queue.put(timed_steps(steps, step))


def timed_steps(steps: int, step) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each of ``steps`` calls of ``step`` after a first one left out."""
    rows = []
    for _ in range(steps + 1):
        cpu, start = time.process_time(), time.perf_counter()
        step()
        rows.append((time.perf_counter() - start, time.process_time() - cpu))
    return rows[1:]


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
            answers: dict[int, tuple] = {}

            def exchange(k: int, step: int = step) -> None:  # as the pushed route: every site's request at once
                task, _ = TensorMessage(KIND_REQUEST, step, [f"p{step}"], gradients[k],
                                        tensor_step=step - 1).to_shareable(WIRE)
                server_end = pipes[k][0]
                server_end.send_bytes(fobs.dumps(task))
                answers[k] = fobs.loads(server_end.recv_bytes()), server_end.recv()

            senders = [threading.Thread(target=exchange, args=(k,)) for k in range(SITES)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            replies = [TensorMessage.from_shareable(answers[k][0], KIND_ACTIVATIONS, site=f"site{k}")
                       for k in range(SITES)]
            times = [answers[k][1] for k in range(SITES)]
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
    # Every process allocates as the project's launchers set theirs: the children by the environment they start
    # with, this one (the split's server) by mallopt before its threads allocate.
    tune_this_process(os.environ)
    os.environ.update(tuned_environment(os.environ))
    cores = os.cpu_count() or 1
    threads_per_site = site_threads(SITES)
    one_process = {}
    for name, target in (("centralized", centralized), ("parties", parties)):
        queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=target, args=(args.steps, cores, queue))
        child.start()
        one_process[name] = [{"step_s": wall, "cpu_s": cpu} for wall, cpu in queue.get()]
        child.join()
    rows = split(args.steps, cores, threads_per_site)
    result = {"steps": args.steps, "cores": cores, "site_threads": threads_per_site,
              **{name: {key: median(per_step, key) for key in ("step_s", "cpu_s")}
                 for name, per_step in one_process.items()},
              "split": {key: median(rows, key) for key in ("step_s", "decoder_s", "slowest_site_s", "cpu_s")}}
    central_row, split_row = result["centralized"], result["split"]
    split_row["neither_s"] = round(split_row["step_s"] - split_row["decoder_s"] - split_row["slowest_site_s"], 3)
    for name in ("parties", "split"):
        result[name]["ratio"] = round(result[name]["step_s"] / central_row["step_s"], 3)
        result[name]["extra_cpu_s"] = round(result[name]["cpu_s"] - central_row["cpu_s"], 3)
    print(f"centralized: {central_row['step_s']:.3f} s/step, {central_row['cpu_s']:.2f} CPU s/step")
    for name, label in (("parties", "cut into parties, one process"), ("split", "split, no NVFlare messaging")):
        row = result[name]
        print(f"{label}: {row['step_s']:.3f} s/step ({row['ratio']:.2f}x centralized), {row['cpu_s']:.2f} CPU "
              f"s/step ({row['extra_cpu_s']:+.2f})")
    print(f"split: decoder {split_row['decoder_s']:.3f}, slowest site {split_row['slowest_site_s']:.3f}, neither "
          f"{split_row['neither_s']:.3f} s")
    if args.out:
        args.out.write_text(json.dumps({**result, "per_step": {**one_process, "split": rows}}, indent=1) + "\n")


if __name__ == "__main__":
    main()

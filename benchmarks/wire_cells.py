"""NVFlare's messaging alone, against the payload size: bytes moved per CPU second of two processes that exchange
split-learning-sized messages through NVFlare cells on loopback, with nothing else running in them (no training,
no task polling, no job). This is the part of a federated step that the wire costs beyond the project's own
encode/decode (``wire_micro.py``): FOBS both ways, NVFlare's streaming (chunks, acknowledgements) and the socket.

A receiver process (cell ``server``, listening on 127.0.0.1) answers every request with a payload of the same size,
as a step's gradients answer its activations; a sender process sends ``--repeats`` requests per size. Each payload is
a Shareable holding a DXO of raw bytes (``TensorMessage``'s format: one bytes field per level). Reported per size:
CPU seconds (user + system) of both processes per round trip and the megabytes they moved per CPU second.

    python benchmarks/wire_cells.py --out docs/performance/wire_cells
    python benchmarks/wire_cells.py --out docs/performance/wire_cells_short_repr --short-repr   # the project's fix
    python benchmarks/wire_cells.py --out OUT --short-repr --scheme grpc   # another of NVFlare's drivers

``--short-repr``: the receiver applies ``split_unet.protocol.nvflare_workarounds.short_received_buffer_repr`` as the
project's controller and executors do (NVFlare otherwise formats every received request into a debug string).
``--scheme``: NVFlare's driver (``tcp``, as the simulator and the POC's direct job connections use; ``atcp``: asyncio
TCP; ``grpc``), insecure on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES_MB = (1, 3, 11, 22, 44, 89)
LEVELS = 4
CHANNEL, TOPIC = "wire", "step"
SCHEMES = ("tcp", "atcp", "grpc")  # NVFlare 2.9's drivers for a cell's root URL (``nvflare/fuel/f3/drivers``)


def payload(megabytes: float):
    """A Shareable of ``megabytes`` raw bytes in ``LEVELS`` fields (the activations of one site's step)."""
    from nvflare.apis.dxo import DXO, DataKind

    size = int(megabytes * 1e6) // LEVELS
    return DXO(DataKind.COLLECTION, data={f"level{k}": os.urandom(size) for k in range(LEVELS)}).to_shareable()


def serve(url: str, short_repr: bool) -> None:
    """The receiver: answer every request with a payload as large as the request's."""
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.message import Message

    if short_repr:
        from split_unet.protocol.nvflare_workarounds import short_received_buffer_repr

        short_received_buffer_repr()

    answers: dict[int, object] = {}

    def answer(request: Message) -> Message:
        size = sum(len(value) for value in request.payload["DXO"]["data"].values())
        if size not in answers:
            answers[size] = payload(size / 1e6)
        return Message(payload=answers[size])

    cell = Cell(fqcn="server", root_url=url, secure=False, credentials={})
    cell.register_request_cb(channel=CHANNEL, topic=TOPIC, cb=answer)
    cell.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the sender closes our stdin
    cell.stop()


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(sizes_mb, repeats: int, short_repr: bool, scheme: str = "tcp") -> list[dict]:
    """Start the receiver, connect, and time ``repeats`` round trips per size (after one unmeasured)."""
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.message import Message

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"{scheme}://127.0.0.1:{probe.getsockname()[1]}"
    receiver = subprocess.Popen([sys.executable, __file__, "--serve", url] + ["--short-repr"] * short_repr,
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        connected = threading.Event()
        cell = Cell(fqcn="sender", root_url=url, secure=False, credentials={})
        cell.core_cell.set_cell_connected_cb(lambda agent: connected.set())
        cell.start()
        if not connected.wait(60):
            raise RuntimeError(f"no connection to the receiver at {url}")
        results = []
        for megabytes in sizes_mb:
            request = payload(megabytes)

            def round_trip():
                reply = cell.send_request(channel=CHANNEL, topic=TOPIC, target="server",
                                          request=Message(payload=request), timeout=300)
                if reply.payload is None or "DXO" not in reply.payload:
                    raise RuntimeError(f"no answer for {megabytes} MB: {reply.headers}")

            round_trip()
            started, wall = cpu_seconds(os.getpid()) + cpu_seconds(receiver.pid), time.perf_counter()
            for _ in range(repeats):
                round_trip()
            cpu = (cpu_seconds(os.getpid()) + cpu_seconds(receiver.pid) - started) / repeats
            wall = (time.perf_counter() - wall) / repeats
            moved = 2 * megabytes  # the request and its answer
            results.append({"megabytes_each_way": megabytes, "cpu_seconds_per_round_trip": round(cpu, 4),
                            "wall_seconds_per_round_trip": round(wall, 4),
                            "mb_per_cpu_second": round(moved / cpu, 1)})
            print(results[-1], flush=True)
        cell.stop()
        return results
    finally:
        receiver.stdin.close()
        try:
            receiver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            receiver.kill()


def plot(results: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = [r["megabytes_each_way"] for r in results]
    axis.plot(sizes, [r["mb_per_cpu_second"] for r in results], marker="o", label="NVFlare cells, two processes")
    axis.axhline(450, color="red", linewidth=1, label="target for the whole federation (450 MB/CPU s)")
    axis.set_xscale("log")
    axis.set_xlabel("payload per message (MB, each way)")
    axis.set_ylabel("MB moved per CPU second")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the receiver process
    parser.add_argument("--out", default="runs/bench/wire_cells", help="writes OUT.json and OUT.png")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MB)), help="MB per message, comma-separated")
    parser.add_argument("--short-repr", action="store_true", help="the receiver applies the project's work-around")
    parser.add_argument("--scheme", choices=SCHEMES, default="tcp", help="NVFlare's driver")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.short_repr)
        return
    load = os.getloadavg()
    results = measure([float(s) for s in args.sizes.split(",")], args.repeats, args.short_repr, args.scheme)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"short_repr": args.short_repr, "scheme": args.scheme,
                                                    "load_before": load, "load_after": os.getloadavg(),
                                                    "cpu_count": os.cpu_count(), "results": results}, indent=2))
    print(f"plot: {plot(results, out.with_suffix('.png'), f'load {load[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')}")


if __name__ == "__main__":
    main()

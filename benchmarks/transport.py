"""The server's requests polled or pushed, and the task check period: the simulator bench per arm, the arms
alternated round by round (a shared machine's load drifts), one row per run (``docs/performance.md``).

    python benchmarks/transport.py --out runs/bench/transport --rounds 2
    python benchmarks/transport.py --out runs/bench/transport_small --size 32 --channels 4,8,16 --rounds 3 \
        --arms before,check_period,push

Arms: ``before`` the polled route with NVFlare's own 0.2 s task check (what the controller got until it set the
period itself), ``check_period`` the polled route as shipped, ``push`` the pushed route (no task check),
``push_ask_2s`` the pushed route with the sites asking for (no) work every 2 s instead of 0.2 s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from split_unet.files import write_json
from split_unet.launch.benchmark import BenchConfig, bench

ARMS = {"before": {"controller_args": {"task_check_period": 0.2}}, "check_period": {}, "push": {"transport": "push"},
        "push_ask_2s": {"transport": "push", "task_request_interval": 2.0}}


def run_row(name: str, run: int, result: dict) -> dict:
    row = result["modes"]["simulator"]
    if "error" in row:
        return {"arm": name, "run": run, "error": row["error"]}
    return {"arm": name, "run": run, "step_seconds": row["step_seconds"]["median"],
            "neither_seconds": row["outside_decoder_and_sites_seconds"]["median"],
            "decoder_seconds": row["decoder_seconds"]["median"], "site_seconds": row["site_seconds"]["median"],
            "cpu_seconds_per_step": row["cpu_seconds_per_step_by_process"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", default="8,16,32,64")
    parser.add_argument("--arms", default=",".join(ARMS))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    base = BenchConfig(epochs=args.epochs, size=args.size, channels=tuple(int(c) for c in args.channels.split(",")))
    rows = []
    for run in range(1, args.rounds + 1):
        for name in args.arms.split(","):
            result = bench(out / f"{name}_{run}", replace(base, **ARMS[name]), modes=("simulator",),
                           data_root=out / "data", progress=lambda _: None)
            rows.append(run_row(name, run, result))
            print(json.dumps(rows[-1]), flush=True)
    write_json(out / "transport.json", {"config": {"size": args.size, "channels": args.channels,
                                                   "epochs": args.epochs}, "runs": rows})


if __name__ == "__main__":
    main()

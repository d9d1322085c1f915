"""The step over a slow link: POC with the sites' connections to the server delayed in each direction
(``launch.delayed_link``, the relayed route), per transport and delay, the arms alternated round by round.

    python benchmarks/link_delay.py --out runs/bench/link_delay --delays 0,10,50 --rounds 1

A pushed step makes one round trip: it should grow by about one round trip (twice the delay), not by several.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from split_unet.files import write_json
from split_unet.launch.benchmark import BenchConfig, bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--delays", default="0,10,50", help="one-way delays in ms")
    parser.add_argument("--transports", default="poll,push")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for run in range(1, args.rounds + 1):
        for delay in (float(d) for d in args.delays.split(",")):
            for transport in args.transports.split(","):
                config = BenchConfig(epochs=args.epochs, transport=transport, link_delay_ms=delay,
                                     direct_job_connections=False, job_timeout=1800.0)
                result = bench(out / f"{transport}_{delay:g}ms_{run}", config, modes=("poc",),
                               data_root=out / "data", progress=lambda _: None)
                row = result["modes"]["poc"]
                rows.append({"transport": transport, "delay_ms": delay, "run": run, **(
                    {"error": row["error"]} if "error" in row else
                    {"step_seconds": row["step_seconds"]["median"],
                     "neither_seconds": row["outside_decoder_and_sites_seconds"]["median"],
                     "round_trips_per_step": row["round_trips_per_step"]})})
                print(json.dumps(rows[-1]), flush=True)
    write_json(out / "link_delay.json", {"config": {"epochs": args.epochs, "route": "relayed"}, "runs": rows})


if __name__ == "__main__":
    main()

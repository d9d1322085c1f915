"""The federation's overhead, change by change: one `split-unet bench` per variant, run one after another on this
machine, and one table of the figures before and after each change (the default job's settings are "tuned").

    python benchmarks/overhead.py --out runs/bench/overhead --docs docs/performance
    python benchmarks/overhead.py --only tuned,chunk_8mb   # a subset (the others' bench.json are reused)

Every variant shares the phantom data (``OUT/data``) and the budget of ``BASE``; a finished variant is not run
again unless ``--again``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from split_unet.launch.benchmark import BenchConfig, bench

BASE = BenchConfig(size=64, patients=24, sites=4, batch_size=2, epochs=2)
# name: (what changes against the tuned job, config overrides, modes)
VARIANTS = {
    "tuned": ("the job as shipped", {}, ("centralized", "simulator", "poc")),
    "polling_2s": ("NVFlare's default task_request_interval of 2 s", {"task_request_interval": 2.0}, ("poc",)),
    "float32_wire": ("float32 activations and gradients", {"wire_dtype": "float32"}, ("poc",)),
    "chunk_8mb": ("streaming chunks of 8 MB instead of 1 MB",
                  {"comm": {"streaming_chunk_size": 8 * 2 ** 20}, "job_timeout": 240}, ("poc",)),
    "micro_batches_2": ("the decoder runs each batch in 2 micro-batches", {"micro_batches": 2}, ("poc",)),
    "checkpointing": ("the decoder recomputes activations in its backward pass", {"decoder_checkpointing": True},
                      ("poc",)),
    "micro_batches_2_checkpointing": ("2 micro-batches and checkpointing in the decoder",
                                      {"micro_batches": 2, "decoder_checkpointing": True}, ("poc",)),
    "malloc_arenas_2": ("glibc malloc limited to 2 arenas per process (MALLOC_ARENA_MAX=2)",
                        {"env": {"MALLOC_ARENA_MAX": 2}}, ("poc",)),
}


def table(results: dict[str, dict]) -> str:
    lines = ["| variant | change | mode | s/step median | x centralized | MB/step/site each way | round trips/step "
             "| peak MB server / site | CPU s/step |", "|---|---|---|---|---|---|---|---|---|"]
    reference = results.get("tuned", {}).get("modes", {}).get("centralized")
    for name, result in results.items():
        for mode, row in result["modes"].items():
            if "error" in row:
                lines.append(f"| {name} | {VARIANTS[name][0]} | {mode} | error: {row['error']} ||||||")
                continue
            ratio = row["step_seconds"]["median"] / reference["step_seconds"]["median"] if reference else float("nan")
            memory = row["peak_memory_mb"]
            if mode == "centralized":
                traffic, trips, peak = "-", "-", f"{memory['process']:.0f} (one process)"
            else:
                traffic = f"{row['bytes_per_step_per_site']['to_server'] / 1e6:.1f}"
                trips, peak = f"{row['round_trips_per_step']:.2f}", f"{memory['server']:.0f} / {memory['site']:.0f}"
            lines.append(f"| {name} | {VARIANTS[name][0]} | {mode} | {row['step_seconds']['median']:.3f} | "
                         f"{ratio:.2f} | {traffic} | {trips} | {peak} | {row['cpu_seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/overhead")
    parser.add_argument("--docs", help="also write overhead.md / overhead.json here")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    parser.add_argument("--again", action="store_true", help="rerun variants that already have a bench.json")
    args = parser.parse_args()
    out = Path(args.out)
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    results = {}
    for name in VARIANTS:
        path = out / name / "bench.json"
        if name in chosen and (args.again or not path.is_file()):
            _, overrides, modes = VARIANTS[name]
            bench(out / name, dataclasses.replace(BASE, **overrides), modes, data_root=out / "data")
        if path.is_file():
            results[name] = json.loads(path.read_text())
    text = table(results)
    print(text)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "overhead.md").write_text(f"# Overhead, change by change\n\n{BASE}\n\n{text}\n")
        (docs / "overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

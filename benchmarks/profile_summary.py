"""Where the CPU of a federation's step goes, from the profiles its processes wrote.

Run a benchmark with ``SPLIT_UNET_PROFILE=DIR`` (yappi installed: ``pip install yappi``); the server's controller
and each site's executor then profile every thread of their process (CPU time) and write
``DIR/<party>-<pid>.pstat`` and ``.json`` at the end of the job. This script sorts each process's CPU into the
stages of a step and writes a Markdown table (and JSON):

    SPLIT_UNET_PROFILE=runs/profile/before split-unet bench --out runs/bench/before --modes simulator,poc
    python benchmarks/profile_summary.py runs/profile/before --steps 18 --out docs/performance/profile

Each function's own CPU (its self time) goes to the stage of its module (``STAGES``, first match); a function of a
general module (the standard library, numpy, torch's C functions, threading, logging) passes its self time on to
the stages of its callers, in proportion to the time each caller spent in it. Profiling slows every Python call,
so the profiled run's totals are larger than an unprofiled run's: read the shares, and take the seconds per step
of an unprofiled run.
"""

from __future__ import annotations

import argparse
import json
import pstats
from pathlib import Path

# stage: (path fragment, function-name prefix) of the functions whose self time is that stage's, first match wins.
STAGES = {
    "compute (encoders, decoder, data, metrics)": [("split_unet/training/", ""), ("split_unet/networks/", ""),
                                                   ("split_unet/data/", ""), ("torch/nn/", ""), ("torch/autograd/", ""),
                                                   ("monai/", ""), ("torch/optim/", "")],
    "encode, decode and checks (split_unet.protocol)": [("split_unet/protocol/codecs.py", ""),
                                                        ("split_unet/protocol/wire.py", "")],
    "FOBS (de)serialisation": [("nvflare/fuel/utils/fobs/", ""), ("msgpack/", ""),
                               ("nvflare/app_common/decomposers/", "")],
    "NVFlare download service (numpy arrays)": [("nvflare/fuel/f3/streaming/download_service.py", ""),
                                                ("nvflare/fuel/f3/streaming/obj_downloader.py", ""),
                                                ("nvflare/fuel/f3/streaming/file_downloader.py", ""),
                                                ("nvflare/app_common/np/", "")],
    "NVFlare receive callback (formats the whole payload into a debug f-string)": [
        ("nvflare/fuel/f3/cellnet/cell.py", "Adapter.call")],
    # asyncio: NVFlare's socket driver runs its connections on an asyncio loop (nothing else here uses asyncio).
    "NVFlare streaming, cellnet, sockets": [("nvflare/fuel/f3/", ""), ("asyncio/", "")],
    "NVFlare task polling, events, bookkeeping": [("nvflare/", "")],
    "split_unet (other)": [("split_unet/", "")],
}


def _own_stage(key: tuple) -> str | None:
    """The stage of a function's module; None for a general one (standard library, numpy, torch's C functions,
    threading, logging), whose self time goes to its callers' stages."""
    path, _, name = key
    for stage, rules in STAGES.items():
        if any(fragment in path and name.startswith(prefix) for fragment, prefix in rules):
            return stage
    return None


def summarise(pstat: Path) -> dict:
    """CPU seconds per stage of one process's profile (see the module docstring)."""
    stats = pstats.Stats(str(pstat)).stats
    shares: dict[tuple, dict[str, float]] = {}
    visiting: set[tuple] = set()

    def stage_shares(key: tuple) -> dict[str, float]:
        """{stage: fraction} of a function's self time (a call cycle back into a function counts for nothing)."""
        if key in shares:
            return shares[key]
        if (own := _own_stage(key)) is not None:
            return {own: 1.0}
        if key in visiting:
            return {}
        visiting.add(key)
        callers = stats.get(key, (0, 0, 0, 0, {}))[4]
        total = sum(edge[3] for edge in callers.values())
        result: dict[str, float] = {}
        for caller, edge in callers.items() if total > 0 else ():
            for stage, fraction in stage_shares(caller).items():
                result[stage] = result.get(stage, 0.0) + fraction * edge[3] / total
        visiting.discard(key)
        shares[key] = result if total > 0 and result else {"other": 1.0}
        return shares[key]

    seconds = dict.fromkeys([*STAGES, "other"], 0.0)
    for key, (_, _, self_time, _, _) in stats.items():
        for stage, fraction in stage_shares(key).items():
            seconds[stage] += fraction * self_time
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="training steps of the profiled run")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    rows = {}
    for pstat in sorted(args.folder.glob("*.pstat")):
        info = json.loads(pstat.with_suffix(".json").read_text())
        seconds = summarise(pstat)
        profiled = sum(t["cpu_seconds"] for t in info["threads"])
        rows[pstat.stem] = {"process_cpu_seconds": info["cpu_seconds"], "profiled_cpu_seconds": round(profiled, 2),
                            "stages": {stage: round(s, 2) for stage, s in seconds.items()}}
    stages = [*STAGES, "other"]
    lines = [f"CPU seconds per training step ({args.steps} steps; the whole job, start-up and validation included, "
             f"divided by the steps), per process and stage. Profiled: read the shares.", "",
             "| stage | " + " | ".join(rows) + " | all |", "|---" * (len(rows) + 2) + "|"]
    for stage in stages:
        values = [row["stages"][stage] / args.steps for row in rows.values()]
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values):.3f} |")
    totals = [sum(row["stages"].values()) / args.steps for row in rows.values()]
    lines.append("| **profiled total** | " + " | ".join(f"{v:.3f}" for v in totals) + f" | {sum(totals):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

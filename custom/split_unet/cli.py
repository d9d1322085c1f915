"""The ``split-unet`` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

from split_unet.errors import SplitUNetError
from split_unet.launch.allocator import tune_this_process
from split_unet.launch.options import add_grid_options, add_train_options, shape_option, train_overrides
from split_unet.studies import ATTACKS
# protocol.transport.TRANSPORTS (importing it would import NVFlare for every command; a test keeps the two equal).
TRANSPORTS = ("poll", "push")
TRANSPORT_HELP = ("how the server's requests reach the sites: 'poll' (NVFlare's task route, the default) or 'push' "
                  "(each request sent to its site at once; every filter still runs; docs/performance.md)")
SCOPE_HELP = ("the sites' privacy scope the job asks for (meta.json scope). Default: the sites' default scope, "
              "'clinical', whose defence (split_unet.defence) the job then carries; 'strict': the bottleneck alone, "
              "the only defence measured to keep every attack at the atlas by SSIM (0.27 mean Dice lower; "
              "docs/privacy.md); 'undefended': no "
              "defence, for phantoms and studies only")


def _print_result(name: str, summary: dict) -> None:
    from split_unet.reports import dice_table

    print()
    print(dice_table({name: summary}))


def cmd_synth(args) -> int:
    from split_unet.data import RELEASE_SHAPE, generate_dataset, generate_release

    if args.release:
        out = generate_release(args.out, args.release, args.patients, args.seed, args.unlabelled, args.size)
        print(f"phantom data set in the {args.release} layout ({args.patients} patients, {args.unlabelled} without "
              f"label, {'x'.join(map(str, RELEASE_SHAPE))} at 1 mm, seed {args.seed}) in {out}")
        return 0
    out = generate_dataset(args.out, n_patients=args.patients, size=args.size, seed=args.seed)
    print(f"phantom data set ({args.patients} patients, {args.size}^3, seed {args.seed}) in {out}")
    return 0


def cmd_partition(args) -> int:
    from split_unet.data import DATALIST, partition_dataset

    folders = partition_dataset(args.data, args.out, overlap=args.overlap, seed=args.seed)
    for site, folder in folders.items():
        datalist = json.loads((folder / DATALIST).read_text())
        kind = "labels" if site == "server" else "images"
        print(f"{site:>8}: {folder} ({len(datalist['patients'])} {kind}, {datalist['convention']} label values)")
    return 0


def cmd_check(args) -> int:
    from split_unet.data.check import COVERAGE_WARNING, Coverage, check_sites, datalist_conventions, problems_as_dicts
    from split_unet.errors import location

    loaded, problems, coverage = check_sites(args.sites, args.size, args.spacing,
                                             args.only.split(",") if args.only else None)
    overall = {"brain": Coverage(), "label": Coverage()}
    for site, count in loaded.items():
        kind = "label" if site == "server" else "brain"
        overall[kind].add(coverage[site])
        print(f"{site:>8}: {count} volumes read; the grid keeps {100 * coverage[site].share:.1f} % of {kind} voxels")
    size = ",".join(map(str, args.size)) if isinstance(args.size, list) else args.size
    grid = f"--size {size}" + (f" --spacing {args.spacing}" if args.spacing else " without --spacing")
    for kind, total in overall.items():
        if total.total:
            print(f"{'overall':>8}: the grid ({grid}) keeps {100 * total.share:.1f} % of {kind} voxels")
    for site, share in ((site, c.share) for site, c in coverage.items() if c.share < COVERAGE_WARNING):
        print(f"warning: site '{site}': the grid ({grid}) keeps only {100 * share:.1f} % of its "
              f"{'label' if site == 'server' else 'brain'} voxels; choose a spacing and a size that cover the brain "
              f"(README, 'Your own data')")
    if convention := datalist_conventions(args.sites, ["server"]).get("server"):
        print(f"label convention (server datalist): {convention}")
    for problem in problems:
        print(f"problem: {location(problem.site, problem.patient, problem.field)}: {problem.message}")
    if args.json:
        shares = {site: {"kept": c.kept, "total": c.total, "share": c.share} for site, c in coverage.items()}
        Path(args.json).write_text(json.dumps({"volumes": loaded, "coverage": shares,
                                               "problems": problems_as_dicts(problems)}, indent=2))
    print(f"{len(problems)} problems" if problems else "all site data readable and co-registered")
    return 1 if problems else 0


def cmd_simulate(args) -> int:
    from split_unet.launch.simulation import run_simulation

    record_steps = [int(step) for step in args.record_steps.split(",")] if args.record_steps else []
    summary = run_simulation(args.sites, args.workspace, training_job(args, record_steps=record_steps),
                             site_configs=args.site_configs, privacy_file=args.privacy)
    if "error" in summary:
        print(f"split learning failed: {summary['error']}", file=sys.stderr)
        return 1
    _print_result("split learning (NVFlare simulator)", summary)
    print(f"\nresults: {Path(args.workspace).resolve() / 'summary.json'}")
    for name, where in summary["artefacts"].items():
        print(f"{name}: {json.dumps(where) if isinstance(where, dict) else where}")
    return 0


def cmd_centralized(args) -> int:
    from split_unet.training import TrainConfig
    from split_unet.training.centralized import train_centralized

    config = TrainConfig.from_dict(train_overrides(args))  # network options: NetworkConfig's defaults for the rest
    summary = train_centralized(args.data, args.out, mode=args.mode, modality=args.modality, config=config,
                                encoders=args.encoders)
    _print_result(f"centralized {args.mode}" + (f" ({args.modality})" if args.modality else ""), summary)
    print(f"\nresults: {Path(args.out).resolve() / 'summary.json'}")
    return 0


def cmd_bench(args) -> int:
    from split_unet.launch.benchmark import BenchConfig, bench, bench_table

    config = BenchConfig(size=args.size, spacing=args.spacing, patients=args.patients, sites=args.n_sites,
                         batch_size=args.batch_size, epochs=args.epochs,
                         channels=tuple(int(c) for c in args.channels.split(",")),
                         wire_dtype=args.wire_dtype, micro_batches=args.micro_batches,
                         activation_compression=None if args.activation_compression == "none" else
                         args.activation_compression,
                         decoder_checkpointing=args.decoder_checkpointing,
                         task_request_interval=args.task_request_interval,
                         direct_job_connections=not args.relayed, job_timeout=args.job_timeout,
                         transport=args.transport,
                         device=args.device, comm=json.loads(args.comm) if args.comm else {})
    results = bench(args.out, config, args.modes.split(","), args.data_root)
    print()
    print(bench_table(results))
    print(f"\nresults: {Path(args.out).resolve() / 'bench.json'}")
    return 0


def cmd_missing(args) -> int:
    from split_unet.studies.missing_modality import evaluate_missing_modalities, missing_modality_table

    results = {}
    for entry in args.runs:
        name, _, workspace = entry.rpartition("=")
        results[name or workspace] = evaluate_missing_modalities(workspace, args.sites)
    print(missing_modality_table(results))
    return 0


def cmd_leakage(args) -> int:
    from split_unet.studies.leakage import evaluate_leakage

    steps = [int(step) for step in args.steps.split(",")] if args.steps else None
    for attack in args.attack:
        results = evaluate_leakage(args.workspace, args.sites, attack, steps=steps, patients=args.patients,
                                   seed=args.seed, iterations=args.iterations)
        for site, per_step in results.items():
            for step, entry in per_step.items():
                scores = " ".join(f"{k} {v:.3f}" for k, v in entry.items() if isinstance(v, float))
                print(f"{attack:>9} {site:>6} step {step:>4} levels {entry.get('levels')}: {scores}")
    print(f"\nresults: {Path(args.workspace).resolve() / 'leakage.json'}")
    return 0


def cmd_report(args) -> int:
    from split_unet.studies.privacy_report import run_sweep

    report = run_sweep(args.sweep, args.sites, args.out, args.site_configs)
    print((Path(args.out) / "report.md").read_text())
    print(f"recommended: {report['recommended']}")
    return 0


def _named_files(items: list[str], file_name: str) -> dict[str, dict]:
    """NAME=DIR_OR_FILE arguments -> {name: parsed JSON}."""
    from split_unet.files import load_json

    rows = {}
    for item in items:
        name, _, path = item.rpartition("=")
        rows[name or path] = load_json(Path(path) / file_name if Path(path).is_dir() else path)
    return rows


def cmd_infer(args) -> int:
    from split_unet.launch.inference import infer_in_simulator

    patients = args.patients.split(",") if args.patients else ()
    if args.choose_postprocessing and (not patients or args.min_component_voxels is not None):
        # Named patients only: choosing on every patient would choose on the ones scored too.
        print("error: --choose-postprocessing needs --patients (labelled training patients) and no "
              "--min-component-voxels", file=sys.stderr)
        return 2
    overrides = {key: getattr(args, key) for key in ("size", "spacing", "min_component_voxels")
                 if getattr(args, key) is not None}
    if args.poc:
        from split_unet.launch.poc import PocFederation, infer_in_poc

        if not args.train_job:
            print("error: --poc needs --train-job", file=sys.stderr)
            return 2
        federation = PocFederation(args.poc, args.sites, args.site_configs)
        try:
            federation.start()
            result = infer_in_poc(federation, args.train_job, Path(args.workspace).resolve(), patients=patients,
                                  overrides=overrides, choose_postprocessing=args.choose_postprocessing)
        finally:
            federation.stop()
    elif args.train_workspace:
        result = infer_in_simulator(args.train_workspace, args.sites, args.workspace, args.site_configs, patients,
                                    overrides=overrides, choose_postprocessing=args.choose_postprocessing)
    else:
        print("error: give --train-workspace (simulator) or --poc and --train-job", file=sys.stderr)
        return 2
    if "error" in result:
        print(f"inference failed: {result['error']}", file=sys.stderr)
        return 1
    if "dice" in result:
        print("Dice " + " ".join(f"{k} {v:.3f}" for k, v in result["dice"].items()))
    if "chosen_on" in result["postprocessing"]:
        sizes = ",".join(map(str, result["postprocessing"]["min_component_voxels"]))
        print(f"post-processing chosen on {len(result['postprocessing']['chosen_on'])} patients: "
              f"--min-component-voxels {sizes} (WT,TC,ET) for the others")
    print(f"{len(result['patients'])} segmentations (NIfTI, {result['convention']} labels, source geometry) in "
          f"{result['segmentations']}")
    return 0


def cmd_poc(args) -> int:
    from split_unet.jobs import PsiJob
    from split_unet.launch.poc import PocFederation, run_pipeline

    federation = PocFederation(Path(args.workspace) / "federation", args.sites, args.site_configs, port=args.port)
    report = run_pipeline(federation, args.workspace, training_job(args, with_code=args.with_code),
                          None if args.no_psi else PsiJob(with_code=args.with_code), job_timeout=args.job_timeout)
    print(json.dumps({k: report[k] for k in ("seconds", "jobs")}, indent=2))
    print(f"results: {Path(args.workspace).resolve() / 'poc.json'}")
    return 0


def cmd_job_export(args) -> int:
    from split_unet.jobs import PsiJob, export_all

    job = training_job(args, psi_job_id=args.psi_job_id or "", with_code=args.with_code, native=args.native)
    for folder in export_all(args.out, job, PsiJob(with_code=args.with_code)):
        print(f"{folder.name}: {folder}  (nvflare job submit -j {folder})")
    return 0


def training_job(args, native: bool = False, **settings):
    """The training job of the command line's training options (on the native job's defaults with ``native``)."""
    from split_unet.jobs import native_settings, training_settings

    if getattr(args, "wire_dtype", None):
        settings["wire_dtype"] = args.wire_dtype
    if getattr(args, "scope", None):
        settings["scope"] = args.scope
    if getattr(args, "transport", None):
        settings["transport"] = args.transport
    return (native_settings if native else training_settings)(train_overrides(args), **settings)


def cmd_table(args) -> int:
    from split_unet.reports import dice_table, leakage_table

    if args.leakage:
        print(leakage_table(_named_files(args.runs, "leakage.json")))
    else:
        print(dice_table(_named_files(args.runs, "summary.json")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="split-unet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate BraTS-like phantoms in the MSD Task01 layout (or, with "
                                              "--release, a real release's layout and geometry)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--patients", type=int, default=64)
    synth.add_argument("--size", type=int, default=64, help="phantom edge (voxels); the phantom spans ~189 mm")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--release", choices=("msd", "brats2021", "brats2023"),
                       help="write the phantoms as that release does, at its geometry (240x240x155, 1 mm)")
    synth.add_argument("--unlabelled", type=int, default=0, help="--release: the last N patients without label")
    synth.set_defaults(func=cmd_synth)

    partition = commands.add_parser("partition", help="split an MSD/BraTS data set into one folder per site")
    partition.add_argument("--data", required=True, help="MSD Task01, BraTS 2021 or BraTS 2023+ folder")
    partition.add_argument("--out", required=True)
    partition.add_argument("--overlap", type=float, help="share of patients every site and the server hold; "
                                                         "each other patient misses at one or more of them "
                                                         "(default: all hold all)")
    partition.add_argument("--seed", type=int, default=0, help="seed of the --overlap choice")
    partition.set_defaults(func=cmd_partition)

    check = commands.add_parser("check", help="check every site's data before a job: datalists, readable volumes, "
                                              "each patient's grid the same at every site")
    check.add_argument("--sites", required=True, help="folder written by `split-unet partition` (or laid out so)")
    check.add_argument("--only", help="comma-separated site folders to check (default: all)")
    add_grid_options(check, size_default=64)
    check.add_argument("--json", help="also write the result to this file")
    check.set_defaults(func=cmd_check)

    simulate = commands.add_parser("simulate", help="run the Split-U-Net job in the NVFlare simulator")
    simulate.add_argument("--sites", required=True, help="folder written by `split-unet partition`")
    simulate.add_argument("--workspace", required=True)
    simulate.add_argument("--site-configs", help="the sites' local settings (default: the package's, "
                                                 "site_configs/ in the repository)")
    simulate.add_argument("--wire-dtype", choices=("float32", "float16"))
    simulate.add_argument("--privacy", help="a privacy.json installed as every site's local privacy policy "
                                            "(default: the sites' own, site_configs/<site>/local/privacy.json)")
    simulate.add_argument("--scope", help=SCOPE_HELP)
    simulate.add_argument("--transport", choices=TRANSPORTS, help=TRANSPORT_HELP)
    simulate.add_argument("--record-steps", help="leakage evaluation: training steps to record, e.g. 1,-1 "
                                                 "(-1 = last); sites keep encoder snapshots of them")
    add_train_options(simulate)
    simulate.set_defaults(func=cmd_simulate)

    centralized = commands.add_parser("centralized", help="the same budget in one process (baselines)")
    centralized.add_argument("--data", required=True, help="MSD Task01, BraTS 2021 or BraTS 2023+ folder")
    centralized.add_argument("--mode", choices=("late", "early", "single"), default="late")
    centralized.add_argument("--modality", choices=("flair", "t1w", "t1gd", "t2w"))
    centralized.add_argument("--out", required=True)
    centralized.add_argument("--encoders", type=int, default=4,
                             help="late fusion: encoders, the modalities repeated beyond four (benchmarks)")
    add_train_options(centralized)
    centralized.set_defaults(func=cmd_centralized)

    bench = commands.add_parser("bench", help="seconds per step, bytes, round trips and peak memory: centralized "
                                              "vs simulator vs POC on phantom data")
    bench.add_argument("--out", required=True)
    bench.add_argument("--modes", default="centralized,simulator,poc")
    bench.add_argument("--size", type=int, default=64, help="phantom and grid edge (voxels): whole volumes")
    bench.add_argument("--spacing", type=float, help="isotropic spacing (mm) to resample to before the crop/pad")
    bench.add_argument("--patients", type=int, default=24, help="phantom patients (a quarter validates)")
    bench.add_argument("--n-sites", type=int, default=4, help="sites; beyond 4, copies of the modalities")
    bench.add_argument("--batch-size", type=int, default=2)
    bench.add_argument("--epochs", type=int, default=2)
    bench.add_argument("--channels", default="8,16,32,64")
    bench.add_argument("--wire-dtype", choices=("float32", "float16"), default="float16")
    bench.add_argument("--activation-compression", choices=("zstd", "none"), default="none",
                       help="lossless compression of the activations the sites send")
    bench.add_argument("--micro-batches", type=int, default=1, help="decoder micro-batches per step (server memory)")
    bench.add_argument("--decoder-checkpointing", action="store_true", help="decoder activation checkpointing")
    bench.add_argument("--task-request-interval", type=float,
                       help="seconds a site waits before asking again when the server has no task for it (default: "
                            "the job's for the transport)")
    bench.add_argument("--transport", choices=TRANSPORTS, default="poll", help=TRANSPORT_HELP)
    bench.add_argument("--job-timeout", type=float, default=600.0,
                       help="seconds a POC job may take before its mode counts as failed (a busy machine needs more)")
    bench.add_argument("--relayed", action="store_true",
                       help="POC: the server's parent process relays the job's messages (NVFlare's default) instead "
                            "of the sites' job processes connecting to the server's directly")
    bench.add_argument("--comm", help='NVFlare comm settings as JSON, e.g. \'{"streaming_chunk_size": 8388608}\'')
    bench.add_argument("--device")
    bench.add_argument("--data-root", help="where phantom data sets are made and reused (default OUT/data)")
    bench.set_defaults(func=cmd_bench)

    missing = commands.add_parser("missing", help="validation Dice of trained runs with each site missing: "
                                                  "NAME=WORKSPACE ...")
    missing.add_argument("runs", nargs="+", help="split-unet simulate workspaces, optionally named NAME=WORKSPACE")
    missing.add_argument("--sites", required=True, help="the partitioned data the runs used")
    missing.set_defaults(func=cmd_missing)

    leakage = commands.add_parser("leakage", help="attack a recorded run (simulate --record-steps): images "
                                                  "from activations, tumour masks from gradients")
    leakage.add_argument("--workspace", required=True, help="a split-unet simulate workspace with a record")
    leakage.add_argument("--sites", required=True, help="the partitioned data the run used (true images)")
    leakage.add_argument("--attack", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    leakage.add_argument("--steps", help="recorded training steps to attack (default: every recorded step)")
    leakage.add_argument("--patients", type=int, default=8, help="patients per recorded step of the image attacks "
                         "(the recorded batch, then what the site would have released for others at that step)")
    leakage.add_argument("--iterations", type=int, help="optimisation budget per attack")
    leakage.add_argument("--seed", type=int, default=0)
    leakage.set_defaults(func=cmd_leakage)

    report = commands.add_parser("report", help="privacy-utility sweep: train, attack and report each defence")
    report.add_argument("--sweep", required=True, help="sweep file (JSON), e.g. benchmarks/privacy_sweep.json")
    report.add_argument("--sites", help="the partitioned data (not needed where every configuration is stored)")
    report.add_argument("--out", required=True)
    report.add_argument("--site-configs", help="default: the package's")
    report.set_defaults(func=cmd_report)

    poc = commands.add_parser("poc", help="a real NVFlare federation on this machine (POC, loopback only): "
                                          "prepare, start, PSI, train, infer, download, stop")
    poc.add_argument("--sites", required=True, help="folder written by `split-unet partition`")
    poc.add_argument("--workspace", required=True, help="the federation's own folder (POC, HOME, results)")
    poc.add_argument("--no-psi", action="store_true", help="no PSI job: train on all common patients")
    poc.add_argument("--site-configs", help="default: the package's")
    poc.add_argument("--port", type=int, help="server port (default: the project file's)")
    poc.add_argument("--scope", help=SCOPE_HELP)
    poc.add_argument("--transport", choices=TRANSPORTS, help=TRANSPORT_HELP)
    poc.add_argument("--with-code", action="store_true", help="jobs carry the split_unet package (BYOC)")
    poc.add_argument("--job-timeout", type=float, default=1800, help="seconds to wait for each job (default 1800)")
    add_train_options(poc)
    poc.set_defaults(func=cmd_poc)

    infer = commands.add_parser("infer", help="segment with a trained Split-U-Net (encoders at the sites, decoder "
                                              "at the server): simulator or POC")
    infer.add_argument("--sites", required=True, help="folder written by `split-unet partition`")
    infer.add_argument("--workspace", required=True, help="output: segmentations/ and inference.json")
    infer.add_argument("--train-workspace", help="simulator: the `split-unet simulate` workspace of the training")
    infer.add_argument("--poc", help="POC: the federation folder of poc/run.sh (WORKSPACE/federation)")
    infer.add_argument("--train-job", help="POC: the training job id")
    infer.add_argument("--patients", help="comma-separated patient ids (default: every patient all sites hold)")
    infer.add_argument("--site-configs", help="default: the package's")
    add_grid_options(infer)  # default: the training's grid
    infer.add_argument("--min-component-voxels", type=shape_option,
                       help="post-processing: remove connected components smaller than this (grid voxels), one size "
                            "or one per region, WT,TC,ET (default: the training's)")
    infer.add_argument("--choose-postprocessing", action="store_true",
                       help="choose --min-component-voxels per region on the --patients segmented, which must be "
                            "labelled training patients (never the ones scored); printed and in inference.json")
    infer.set_defaults(func=cmd_infer)

    job = commands.add_parser("job", help="NVFlare jobs for a federation (nvflare job submit -j DIR)")
    job_commands = job.add_subparsers(dest="job_command", required=True)
    export = job_commands.add_parser("export", help="write the PSI and training jobs to OUT/split_unet_psi and "
                                                    "OUT/split_unet (the repository's jobs/ holds the defaults)")
    export.add_argument("--out", required=True)
    export.add_argument("--scope", help=SCOPE_HELP)
    export.add_argument("--transport", choices=TRANSPORTS, help=TRANSPORT_HELP)
    export.add_argument("--psi-job-id", help="train on the intersection this PSI job found")
    export.add_argument("--wire-dtype", choices=("float32", "float16"))
    export.add_argument("--with-code", action="store_true", help="the jobs carry the split_unet package (BYOC)")
    export.add_argument("--native", action="store_true",
                        help="the native job (OUT/split_unet_native): 240x240x155 at 1 mm, 128^3 patches, "
                             "augmentation, sliding windows, a GPU-sized network")
    add_train_options(export)
    export.set_defaults(func=cmd_job_export)

    table = commands.add_parser("table", help="Dice (or --leakage) table of runs: NAME=DIR_OR_FILE ...")
    table.add_argument("runs", nargs="+")
    table.add_argument("--leakage", action="store_true", help="tabulate leakage.json files instead")
    table.set_defaults(func=cmd_table)
    return parser


#: Import name -> distribution name of the optional dependencies (setup.cfg's extras say which extra holds each).
OPTIONAL_MODULES = {"skimage": "scikit-image", "matplotlib": "matplotlib", "nilearn": "nilearn", "yappi": "yappi"}


def extra_providing(error: ModuleNotFoundError) -> str | None:
    """The extra of this package's metadata (other than ``test``) that installs the module ``error`` misses."""
    distribution = OPTIONAL_MODULES.get((error.name or "").split(".")[0])
    for requirement in importlib.metadata.requires("split-unet") or () if distribution else ():
        name, _, marker = requirement.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra and extra.group(1) != "test" and re.match(rf"{re.escape(distribution)}(?![\w.-])", name.strip()):
            return extra.group(1)
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv`` None: this process's arguments, and its allocator set as the launchers set their
    processes', see ``split_unet.launch.allocator``)."""
    if argv is None:
        tune_this_process(os.environ)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SplitUNetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if (extra := extra_providing(error)) is None:
            raise
        print(f"split-unet {args.command} needs the {extra} extra: pip install 'split-unet[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

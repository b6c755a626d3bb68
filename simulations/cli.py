"""The ``metafed`` command.

    metafed simulate      [--config FILE] [--set section.key=value ...] [--resume RUN_DIR] [--ray-address ADDR]
                          [--verbose]
    metafed make-data     [--config FILE] [--set section.key=value ...] [--out DIR] [--workers N]
    metafed compare       [--config FILE] [--set ...] [--algorithms fedavg,reptile,...]
    metafed privacy-sweep [--config FILE] [--set ...] [--epsilons inf,8,4,2,1] [--levels record,client]
    metafed plan-privacy  [--config FILE] [--set ...] --target-epsilon 4 [--level record|client]
    metafed reset-ledger  LEDGER_OR_SITE_DIR [--receipt FILE] --yes
    metafed import        SRC... --out DIR [options] | --array NAME=FILE... --labels FILE --out DIR
    metafed check-site    DIR... [--config FILE] [--set ...] [--write-schema FILE]
    metafed report        RUN_DIR... [--out DIR]
    metafed deploy run    CONNECTION [--config FILE] [--set ...] [--app DIR] [--run-name NAME] [--max-resumes 2]

A bad config (unknown key, wrong type, missing file), bad data or a run
directory without a checkpoint prints the reason on stderr and exits with code
2, before anything is started or written (:mod:`simulations.preflight`); a run
that fails exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.config import ConfigError, load
from simulations import data_commands

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from simulations.experiments import ALGORITHMS

    parser = argparse.ArgumentParser(prog="metafed", description="Federated meta-learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a Flower simulation of an experiment config")
    sim.add_argument("--config", help="YAML experiment file (e.g. simulations/configs/default.yaml)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set federation.rounds=10 (repeatable)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a run from its latest checkpoint (uses RUN_DIR/config.yaml plus --set)")
    sim.add_argument("--ray-address", metavar="ADDR",
                     help="attach to a running Ray cluster (host:6379, ray://host:10001 or auto) instead of "
                          "starting a local one: the same as --set runtime.ray_address=ADDR")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")

    cmp_ = sub.add_parser("compare", help="each algorithm under the same seed, sites and rounds")
    cmp_.add_argument("--config", help="YAML experiment file")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp_.add_argument("--algorithms", default=",".join(ALGORITHMS),
                      help="comma-separated; 'none' (the random initialization) may be named too, and the "
                           "table has its row either way")

    sweep = sub.add_parser("privacy-sweep", help="held-out accuracy against epsilon (record and client level)")
    sweep.add_argument("--config", help="YAML experiment file")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--epsilons", default="inf,8,4,2,1")
    sweep.add_argument("--levels", default="record,client")

    plan = sub.add_parser("plan-privacy", help="the noise multiplier that reaches a target epsilon")
    plan.add_argument("--config", help="YAML experiment file")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--target-epsilon", type=float, required=True)
    plan.add_argument("--level", choices=("record", "client"), default="record")

    reset = sub.add_parser("reset-ledger", help="start a site's privacy budget again (moves its ledger aside)")
    reset.add_argument("ledger", metavar="LEDGER_OR_SITE_DIR",
                       help="the ledger file, or a site directory (its privacy_ledger.json)")
    reset.add_argument("--receipt", help="the ledger's receipt when it is kept elsewhere (site_privacy.state_dir)")
    reset.add_argument("--yes", action="store_true", help="confirm: the site forgets the budget it has spent")

    report = sub.add_parser("report", help="finished runs side by side: a markdown table and accuracy plots")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with summary.json)")
    report.add_argument("--out", default="report",
                        help="folder for report.md and the plots (default: ./report)")
    deploy = sub.add_parser("deploy", help="runs on a deployed SuperLink (see deploy/README.md)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    drun = deploy_sub.add_parser("run", help="submit with flwr run, follow, resume after a ServerApp loss; "
                                 "exit 0 completed, 1 failed, 2 bad input")
    drun.add_argument("connection", metavar="CONNECTION",
                      help="a [superlink.NAME] section of $FLWR_HOME/config.toml (deploy/flwr-config.toml)")
    drun.add_argument("--config", help="YAML experiment file (federation.mode is set to deployment)")
    drun.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    drun.add_argument("--app", default=str(Path(__file__).resolve().parents[1]),
                      help="the Flower app folder (default: this metafed checkout)")
    drun.add_argument("--run-name", help="the run directory's name under output_dir (default: NAME-<UTC time>)")
    drun.add_argument("--max-resumes", type=int, default=2,
                      help="resubmissions after the ServerApp or SuperLink died (default 2; 0: none)")
    drun.add_argument("--poll", type=float, default=2.0, help="seconds between status checks (default 2)")
    drun.add_argument("--superlink-patience", type=float, default=300.0,
                      help="seconds the SuperLink may stay unreachable before the run counts as failed")

    data = sub.add_parser("make-data", help="write the procedural benchmark's site directories")
    data.add_argument("--config", help="YAML experiment file (its data section is used)")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    data.add_argument("--out", help="data root to write (default: data.root of the config)")
    data.add_argument("--workers", type=_workers, default=None, metavar="N",
                      help="processes writing the sites (default: the cores this process may use); "
                      "the files are the same for any N")

    data_commands.add_parsers(sub)
    return parser


def _is_input_error(err: ValueError) -> bool:
    """A bad config, bad data or a run directory that cannot be resumed.

    The data and checkpoint modules pull in torch; they are looked up only when
    already imported (an error of theirs means they were), to keep the
    command's start fast.
    """
    kinds: list[type] = [ConfigError]
    for module, name in (("common.data.site", "SiteDataError"), ("server.checkpoint", "CheckpointError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(err, tuple(kinds))


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers (inf allowed), got {text!r}") from None


def _experiment(args: argparse.Namespace, config) -> int:
    from simulations import experiments

    try:
        if args.command == "compare":
            algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
            unknown = sorted(set(algorithms) - set(experiments.SELECTABLE))
            if unknown:
                raise ConfigError(f"--algorithms: unknown {unknown}; choose from {', '.join(experiments.SELECTABLE)}")
            experiments.compare(config, algorithms=algorithms)
        elif args.command == "privacy-sweep":
            levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
            if set(levels) - {"record", "client"}:
                raise ConfigError(f"--levels: record and/or client, got {args.levels!r}")
            experiments.privacy_sweep(config, epsilons=_floats(args.epsilons), levels=levels)
        else:
            from simulations.runner import absolute_paths, prepare_data

            config = absolute_paths(config)
            _, text = experiments.plan(config, level=args.level, target_epsilon=args.target_epsilon,
                                       num_sites=len(prepare_data(config)))
            print(text)
    except (experiments.RunFailed, experiments.SomeRunsFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _reset_ledger(args: argparse.Namespace) -> int:
    from common.privacy.ledger import default_path, default_receipt_path, reset

    ledger = Path(args.ledger)
    ledger = default_path(ledger) if ledger.is_dir() else ledger
    receipt = Path(args.receipt) if args.receipt else default_receipt_path(ledger)
    if not ledger.exists() and not receipt.exists():
        raise ConfigError(f"neither the ledger {ledger} nor its receipt {receipt} exists: nothing to reset")
    if not args.yes:
        raise ConfigError(
            f"resetting {ledger} makes its site forget the privacy budget it has spent, which voids the "
            "site's guarantee for what it released before; add --yes to do it (both files are kept, renamed "
            "*.reset-<time>)"
        )
    for old, new in reset(ledger, receipt=receipt):
        print(f"moved {old} -> {new}")
    print(f"the site's next round starts a new ledger at {ledger}")
    return EXIT_OK


def _deploy_run(args: argparse.Namespace) -> int:
    from simulations import deploy_run

    overrides = ["federation.mode=deployment", *args.overrides]
    config = load(args.config, overrides=overrides)
    outcome = deploy_run.deploy_run(
        config, connection=args.connection, app=Path(args.app), run_name=args.run_name,
        max_resumes=args.max_resumes, poll=args.poll, superlink_patience=args.superlink_patience,
        emit=lambda line: print(line, flush=True),
    )
    if outcome.code == EXIT_USAGE:
        raise deploy_run.DeployError(outcome.reason)
    if outcome.code != EXIT_OK:
        print(f"error: run {outcome.run_ids[-1] if outcome.run_ids else '-'} {outcome.status}: {outcome.reason}",
              file=sys.stderr, flush=True)
    return outcome.code


def main(argv: list[str] | None = None) -> int:
    """The ``metafed`` command (``argv=None``: the process's command line)."""
    code = _main(argv)
    if argv is None and code in (EXIT_OK, EXIT_FAILED):
        # After a simulation, Ray's and gRPC's native threads make interpreter
        # shutdown take seconds; everything is written and Ray is shut down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    # Flower's usage telemetry would wait on a network this tool does not need;
    # set FLWR_TELEMETRY_ENABLED=1 to send it anyway.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        if args.command == "simulate":
            if args.ray_address is not None:
                args.overrides = [*args.overrides, f"runtime.ray_address={args.ray_address}"]
            if args.resume:
                if args.config:
                    raise ConfigError(
                        "--resume continues a run with its own config.yaml; change values with --set, not --config"
                    )
                run_dir = Path(args.resume)
                if not (run_dir / "config.yaml").is_file():
                    raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it)")
                config = load(run_dir / "config.yaml", overrides=args.overrides)
                from simulations.runner import simulate

                return simulate(config, resume_dir=run_dir, verbose=args.verbose)
            config = load(args.config, overrides=args.overrides)
            from simulations.runner import simulate

            return simulate(config, verbose=args.verbose)
        if args.command in ("compare", "privacy-sweep", "plan-privacy"):
            return _experiment(args, load(args.config, overrides=args.overrides))
        if args.command == "deploy":
            return _deploy_run(args)
        if args.command == "reset-ledger":
            return _reset_ledger(args)
        if args.command == "import":
            return data_commands.run_import(args)
        if args.command == "check-site":
            return data_commands.run_check_site(args)
        if args.command == "report":
            from simulations.report import write_report

            markdown, written = write_report(args.runs, out_dir=args.out)
            print(markdown)
            print("\n".join(f"wrote {p}" for p in written))
            return EXIT_OK
        if args.command == "make-data":
            from common.data.procedural import available_cores
            from simulations.runner import make_data

            config = load(args.config, overrides=args.overrides)
            workers = args.workers or available_cores()
            for path in make_data(config, args.out, workers=workers, progress=data_commands.ProgressBar()):
                count = sum(1 for p in path.iterdir() if p.is_dir())
                print(f"{path}: {count} sites")
            return EXIT_OK
    except ValueError as err:
        if not _is_input_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

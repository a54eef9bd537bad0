"""The `testbed` command line: validate and run scenarios, with progress and a results table."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import importlib
from testbed.core.errors import TestbedError
from testbed.core.scenario import Scenario, ScenarioError, load_scenario

if TYPE_CHECKING:
    from testbed.compare import CompareRow, Contender

# Commands defined in modules of their own, imported only when one of them (or the full help) is asked for, so
# that `testbed validate` loads nothing beyond testbed.core.
COMMAND_MODULES = {"channel": "testbed.channel_command", "bench": "testbed.channel_command",
                   "board": "testbed.hil_commands", "attach": "testbed.hil_commands",
                   "device": "testbed.device_commands", "fleet": "testbed.fleet_commands",
                   "broker-config": "testbed.broker_config",
                   "keygen": "testbed.key_commands",
                   "data": "testbed.data_commands"}
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_BAD_SCENARIO = 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-testbed")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def _command_word(argv: list[str]) -> str | None:
    """The command the arguments name, or None when they name none (help, or a typo: then every command is built)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Hardware-in-the-loop testbed for deep partial updating of neural networks over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"testbed {_version()}",
                        help="print the version of edge-testbed and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a scenario end to end")
    run.add_argument("scenario", type=Path, nargs="?", default=None, help="scenario YAML file (not with --resume)")
    run.add_argument("--out", type=Path, default=None, help="results folder (default: runs/<name>-<time>)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue the run whose results folder is DIR from its last checkpoint (DIR/checkpoint.pt, "
                          "written after each round), with DIR's scenario.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                     help="override a scenario field, e.g. --set update.ratio=0.01 (repeatable)")
    run.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                     help="sign the run's updates with this key (from `testbed keygen`); default: a fresh key per run")
    run.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    compare = commands.add_parser("compare", help="compare update strategies and ratios on the server only")
    compare.add_argument("scenario", type=Path, help="scenario YAML file (its data, model and training settings)")
    compare.add_argument("--strategies", default="full,dpu,gcpu,rpu,pruning,magnitude,no-update,biases-only",
                         help="comma-separated strategies, each optionally with settings of its own, e.g. "
                              "dpu[lambda=1,reinit=false]; 'full' is the reference and is always run")
    compare.add_argument("--ablation", action="store_true",
                         help="add DPU's 2x2 ablation: lambda 0.5 and 1, each with re-initialisation on and off")
    compare.add_argument("--ratios", default="0.005,0.01,0.05", help="comma-separated update ratios k")
    compare.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1 and average")
    compare.add_argument("--jobs", type=int, default=None, metavar="N",
                         help="worker processes for the runs (default: one per core); results do not depend on it")
    compare.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare-<name>-<time>)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                         help="override a scenario field, as for run (repeatable)")
    validate = commands.add_parser("validate", help="check a scenario file and print it resolved")
    validate.add_argument("scenario", type=Path, help="scenario YAML file")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                          help="override a scenario field, as for run (repeatable)")
    validate.add_argument("--resolve", action="store_true",
                          help="also load the plugins the scenario names and let them check it (link profiles and "
                               "trace files, strategy settings); without it only testbed.core is imported")
    wanted = _command_word(sys.argv[1:] if argv is None else argv)
    built_here = {"run", "compare", "validate", "report", "monitoring"}
    for module in dict.fromkeys(COMMAND_MODULES.values()):
        if wanted is None or (wanted not in built_here and COMMAND_MODULES.get(wanted, module) == module):
            importlib.import_module(module).add_commands(commands)
    _add_report_commands(commands)
    return parser


# --- `testbed report` and `testbed monitoring` ---------------------------------------------------------------

def _add_report_commands(commands: Any) -> None:
    report = commands.add_parser("report", help="write plots and report.html for one run, or several overlaid")
    report.add_argument("runs", type=Path, nargs="+", metavar="DIR", help="results folder(s) of `testbed run`")
    report.add_argument("--out", type=Path, default=None,
                        help="output folder (default: DIR itself for one run; required for several)")
    monitoring = commands.add_parser("monitoring", help="how to watch runs live in Prometheus and Grafana")
    monitoring.add_argument("--port", type=int, default=9464, help="the exporter port your scenarios use")


def _command_report(args: argparse.Namespace, console: Console) -> int:
    from testbed.report import ReportError, write_report

    try:
        page = write_report(args.runs, args.out)
    except ReportError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        return EXIT_BAD_SCENARIO
    console.print(f"report: {page} (plots: accuracy.png, bytes.png, energy.png, delivery.png in {page.parent})",
                  highlight=False)
    return EXIT_OK


def _command_monitoring(args: argparse.Namespace, console: Console) -> int:
    from testbed.metrics import monitoring_guide

    console.print(monitoring_guide(exporter_port=args.port), highlight=False, markup=False)
    return EXIT_OK


def _write_run_report(out_dir: Path, console: Console) -> None:
    """After a run: its plots and report.html; a report that fails is a warning, not a failed run."""
    from testbed.report import ReportError, write_report

    try:
        console.print(f"report: {write_report(out_dir)}", highlight=False)
    except (ReportError, OSError, ValueError) as error:
        console.print(f"[yellow]report not written:[/] {error}", highlight=False)

# --- end of `testbed report` and `testbed monitoring` --------------------------------------------------------


def _default_out(scenario: Scenario) -> Path:
    return Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class _RichProgress:
    """Renders runner events: a progress bar over rounds and one line per round."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=console, transient=False,
        )
        self.task: Any = None
        self.devices = 0
        self.reported = 0
        self.broker = "broker"  # what the run started ("embedded amqtt", "mosquitto 2.0.11"), said in the header

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "waiting-for-board" and data.get("network"):
            self.console.print(f"waiting for board {data['device']}: its link listens on {data['broker']}; on the "
                               f"board, run\n  {data['command']}", highlight=False, markup=False)
        elif event == "waiting-for-board":
            self.console.print(
                f"waiting for board {data['device']}: on the host it is attached to, run\n"
                f"  testbed attach --name {data['device']} --broker {data['broker']} --port PORT"
                + (f" --username {data['username']} --password-file FILE" if data.get("username") else ""),
                highlight=False)
        elif event == "waiting-for-fleet":
            self.console.print(f"waiting for devices {data['devices']}: on the host that runs them, run\n"
                               f"  testbed fleet --broker HOST:PORT --run {data['run_id']} --devices {data['devices']}",
                               highlight=False, markup=False)
        elif event == "warning":  # before the run starts, too (e.g. an exporter reachable from the network)
            self.console.print(f"[yellow]warning:[/] {data['message']}", highlight=False)
        elif event == "board-status":
            self.console.print(f"  board {data['device']} {'online' if data['online'] else '[yellow]offline[/]'}")
        elif event == "broker-started":
            self.broker = f"{data['broker']} on"
        if event == "starting":
            self.devices = data["devices"]
            self.console.print(
                f"[bold]{data['devices']} devices[/] via {self.broker} {data['broker']}; "
                f"downlink {data['downlink']}; uplink {data['uplink']}"
                + (f"; metrics at {data['metrics']}" if data["metrics"] else "")
                + f"; updates signed by {data['signing_key']}"
            )
            self.progress.start()
            self.task = self.progress.add_task("rounds", total=data["rounds"], status="")
        elif self.task is None:
            return
        elif event == "training":
            self.reported = 0
            self.progress.update(self.task, status=f"round {data['round']}: training")
        elif event == "publishing":
            self.progress.update(self.task, status=(
                f"round {data['round']}: sending v{data['version']} ({data['update_bytes']} B)"))
        elif event == "device":
            self.reported += 1
            self.progress.update(self.task, status=f"round {data['round']}: {self.reported}/{self.devices} devices")
        elif event == "skipped":
            self.progress.update(self.task, status=f"round {data['round']}: nothing sent")
        elif event == "push-failed":
            self.console.print(f"[yellow]warning:[/] {data['error']}", highlight=False)
        elif event == "broker-reconnected":
            self.console.print(f"  [yellow]the run reconnected to the broker[/] ({data['reconnects']} "
                               f"reconnect(s) so far); devices that lost updates in flight get catch-ups")
        elif event == "event":  # a scenario event fired or ended (testbed.run_events)
            self.console.print(f"  [magenta]event[/] {data['description']}", highlight=False)
        elif event == "catch-up":
            self.console.print(f"  catch-up for {data['device']} from v{data['from']} ({data['bytes']} B): "
                               f"{data['reason']}")
        elif event == "interrupting":
            self.console.print("[yellow]Ctrl-C[/]: ending the round in progress, then writing the summary "
                               "(Ctrl-C again to abort without it)")
        elif event == "round":
            record = data["record"]
            self.progress.advance(self.task)
            self.console.print(_round_line(record, self.devices), markup=False, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def _round_line(record: Any, devices: int) -> str:
    """The console line of a finished round; a re-initialisation round (trained from w⁰) says so."""
    reinit = (" [re-initialisation round: the training set doubled, so it was trained from w⁰]"
              if record.reinitialised else "")
    if not record.sent:
        return (f"round {record.round}: server acc {record.server_accuracy:.3f}, nothing sent (the candidate "
                f"validated {record.validation_accuracy:.3f}, not enough to replace the deployed v{record.version}){reinit}")
    return (f"round {record.round}: server acc {record.server_accuracy:.3f}, update {record.update_bytes} B "
            f"({100 * record.update_bytes / record.full_model_bytes:.1f}% of full), "
            f"{record.devices_updated}/{devices} devices in {record.round_seconds:.1f} s{reinit}")


def _round_table(summary: dict[str, Any], records: list[dict[str, Any]]) -> Table:
    """Per round: server accuracy and bytes sent, then one line per device (accuracy, energy, delivery)."""
    table = Table(title=f"{summary['scenario']}: {summary['strategy']} at ratio {summary['ratio']}, per round")
    for column in ("rnd", "srv acc", "bytes", "% full", "device", "acc", "J", "deliv s"):
        table.add_column(column, justify="left" if column == "device" else "right", no_wrap=True)
    by_round: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["round"], []).append(record)
    for round_record in summary["rounds"]:
        server_cells = [
            str(round_record["round"]), f"{round_record['server_accuracy']:.3f}",
            str(round_record["update_bytes"]),
            f"{100 * round_record['update_bytes'] / round_record['full_model_bytes']:.1f}",
        ]
        if not round_record["sent"]:
            table.add_row(*server_cells, "[dim]nothing sent[/]", "", "", "", end_section=True)
            continue
        for position, record in enumerate(by_round.get(round_record["round"], [])):
            cells = server_cells if position == 0 else [""] * len(server_cells)
            if record.get("delivered"):
                device_cells = [f"{record['accuracy']:.3f}", f"{record['energy_joules']:.2f}",
                                f"{record['delivery_seconds']:.2f}"]
            else:
                device_cells = ["[red]missed[/]", "", ""]
            table.add_row(*cells, record["device"], *device_cells,
                          end_section=position == len(by_round[round_record["round"]]) - 1)
    return table


def _device_table(summary: dict[str, Any]) -> Table:
    """Per device: where it ended and what it cost."""
    table = Table(title="devices at the end of the run")
    for column in ("device", "profile", "ver", "acc", "J", "bytes", "= server"):
        table.add_column(column, justify="left" if column == "device" else "right", no_wrap=True)
    for device_id, state in summary["devices"].items():
        accuracy = state["final_accuracy"]
        table.add_row(
            device_id, state["profile"], str(state["final_version"]),
            "-" if accuracy is None else f"{accuracy:.3f}", f"{state['energy_joules']:.1f}",
            str(state["bytes_received"]), "[green]yes[/]" if state["hash_matches_server"] else "[red]no[/]",
        )
    return table


def _load(path: Path, overrides: list[str], console: Console, resolve: bool = True) -> Scenario | None:
    """The scenario at ``path``; with ``resolve``, also checked by the plugins it names (testbed.preflight)."""
    try:
        scenario = load_scenario(path, overrides)
        if resolve:
            from testbed.preflight import check_scenario

            check_scenario(scenario, str(path))
        return scenario
    except ScenarioError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        return None


def _command_validate(args: argparse.Namespace, console: Console) -> int:
    scenario = _load(args.scenario, args.overrides, console, resolve=args.resolve)
    if scenario is None:
        return EXIT_BAD_SCENARIO
    console.print(f"{args.scenario}: valid, {len(scenario.device_ids())} devices", highlight=False)
    console.print(scenario.to_yaml(), highlight=False, markup=False)
    return EXIT_OK


def _command_run(args: argparse.Namespace, console: Console) -> int:
    import json

    from testbed import event_loop
    from testbed.runner import run_scenario

    from testbed.core.signing import SigningKey, SigningKeyError

    resume = None
    if args.resume is not None:
        from testbed.run_checkpoint import ResumeError, read_resumable

        if args.scenario is not None or args.overrides or args.out is not None:
            console.print("[red]error:[/] --resume DIR runs DIR's own scenario.yaml into DIR: give no scenario file, "
                          "--set or --out with it", highlight=False)
            return EXIT_BAD_SCENARIO
        try:
            scenario, resume = read_resumable(args.resume)
        except ResumeError as error:
            console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
            return EXIT_BAD_SCENARIO
    elif args.scenario is None:
        console.print("[red]error:[/] testbed run needs a scenario file, or --resume DIR", highlight=False)
        return EXIT_BAD_SCENARIO
    else:
        loaded = _load(args.scenario, args.overrides, console)
        if loaded is None:
            return EXIT_BAD_SCENARIO
        scenario = loaded
    try:
        signing_key = None if args.signing_key is None else SigningKey.load(args.signing_key)
    except SigningKeyError as error:
        console.print(f"[red]error:[/] --signing-key: {error}", highlight=False)
        return EXIT_BAD_SCENARIO
    out_dir = args.resume or args.out or _default_out(scenario)
    console.print(f"[bold]{scenario.name}[/]: {scenario.rounds} rounds, strategy {scenario.update.strategy} "
                  f"at ratio {scenario.update.ratio}; results in {out_dir}")
    if resume is not None:
        console.print(f"resuming run {resume.run_id} at round {resume.server.next_round} (its checkpoint); results "
                      f"of later rounds in results.jsonl are redone", highlight=False)
    progress = _RichProgress(console)
    started = time.monotonic()
    try:
        result = event_loop.run(run_scenario(scenario, out_dir, progress, signing_key, resume))
    except KeyboardInterrupt:  # a second Ctrl-C: no summary
        progress.stop()
        console.print("[yellow]aborted[/] (second Ctrl-C); results so far are in " + str(out_dir))
        return EXIT_INTERRUPTED
    except TestbedError as error:  # something the user can act on: one line (exit 2 when the scenario is to fix)
        progress.stop()
        logging.getLogger("testbed").debug("run failed", exc_info=True)
        console.print(f"[red]run failed:[/] {escape(str(error))}", highlight=False)
        return EXIT_BAD_SCENARIO if isinstance(error, ScenarioError) else EXIT_RUN_FAILED
    except Exception as error:  # not one of ours: a bug; still one line, the traceback with -v
        progress.stop()
        logging.getLogger("testbed").debug("run failed", exc_info=True)
        console.print(f"[red]run failed:[/] {type(error).__name__}: {error} (unexpected: rerun with -v for the "
                      "traceback and report it)", highlight=False)
        return EXIT_RUN_FAILED
    progress.stop()
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines() if line]
    console.print(_round_table(result.summary, records))
    console.print(_device_table(result.summary))
    _write_run_report(out_dir, console)
    missing = [d for d, s in result.summary["devices"].items() if not s["hash_matches_server"]]
    if result.summary["interrupted"]:
        console.print(f"[yellow]interrupted[/] after {len(result.summary['rounds'])} of "
                      f"{result.summary['rounds_planned']} rounds in {time.monotonic() - started:.1f} s; "
                      f"summary.json and the report are in {out_dir}", highlight=False)
        return EXIT_INTERRUPTED
    console.print(f"done in {time.monotonic() - started:.1f} s; results in {out_dir}")
    if missing:
        console.print(f"[red]devices not on the server's final model:[/] {', '.join(missing)}")
        return EXIT_RUN_FAILED
    return EXIT_OK


def _parse_compare_grid(args: argparse.Namespace, console: Console) -> tuple[list[Contender], list[float]] | None:
    from testbed.compare import ABLATION, REFERENCE_STRATEGY, CompareError, Contender, parse_contenders

    try:
        strategies = parse_contenders(args.strategies)
    except CompareError as error:
        console.print(f"[red]error:[/] --strategies: {escape(str(error))}", highlight=False)
        return None
    strategies += [contender for contender in ABLATION if args.ablation and contender not in strategies]
    if Contender(REFERENCE_STRATEGY) not in strategies:
        strategies.insert(0, Contender(REFERENCE_STRATEGY))
    try:
        ratios = [float(text) for text in args.ratios.split(",") if text.strip()]
    except ValueError:
        console.print(f"[red]error:[/] --ratios: not a list of numbers: {args.ratios!r}", highlight=False)
        return None
    if not ratios or any(not 0.0 < ratio <= 1.0 for ratio in ratios):
        console.print(f"[red]error:[/] --ratios: each ratio must be in (0, 1], got {args.ratios!r}", highlight=False)
        return None
    if args.seeds < 1:
        console.print(f"[red]error:[/] --seeds must be at least 1, got {args.seeds}", highlight=False)
        return None
    if args.jobs is not None and args.jobs < 1:
        console.print(f"[red]error:[/] --jobs must be at least 1, got {args.jobs}", highlight=False)
        return None
    return strategies, ratios


def _command_compare(args: argparse.Namespace, console: Console) -> int:
    from server.update_server import UpdateServer
    from testbed.compare import CellStore, CompareError, check_contenders, default_jobs, run_comparison, runs_needed
    from testbed.compare_report import markdown_table, paper_reference_table, write_report

    scenario = _load(args.scenario, args.overrides, console)
    grid = None if scenario is None else _parse_compare_grid(args, console)
    if scenario is None or grid is None:
        return EXIT_BAD_SCENARIO
    strategies, ratios = grid
    try:
        check_contenders(scenario, strategies, ratios[0])
    except CompareError as error:
        console.print(f"[red]error:[/] --strategies: {escape(str(error))}", highlight=False)
        return EXIT_BAD_SCENARIO
    seeds = [scenario.seed + offset for offset in range(args.seeds)]
    out_dir = args.out or Path("runs") / f"compare-{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rounds = UpdateServer(scenario).rounds
    total = runs_needed(scenario, strategies, ratios, seeds) * rounds
    jobs = args.jobs or default_jobs()
    console.print(f"[bold]compare {scenario.name}[/]: {escape(', '.join(c.label for c in strategies))} at k = "
                  f"{', '.join(map(str, ratios))}, {len(seeds)} seed(s), {rounds} rounds each ({total} rounds, "
                  f"{jobs} worker process(es)); results in {out_dir} "
                  "(finished cells are kept in cells/: run again with the same --out to go on)",
                  highlight=False)
    started = time.monotonic()
    store = CellStore(out_dir, scenario)
    progress = _CompareProgress(console, total)
    try:
        with progress:
            rows = run_comparison(scenario, strategies, ratios, seeds, progress.round_done, store,
                                  progress.cell_skipped, jobs)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/] after {progress.done} of {total} rounds; the finished cells are kept in "
                      f"{out_dir / 'cells'}: run the same command again to go on", highlight=False)
        return EXIT_INTERRUPTED
    summaries = write_report(rows, out_dir, f"{scenario.name}: strategies compared")
    console.print(markdown_table(summaries), markup=False, highlight=False)
    console.print(paper_reference_table(), markup=False, highlight=False)
    console.print(f"done in {time.monotonic() - started:.1f} s; compare.csv, compare.md, compare.png in {out_dir}",
                  highlight=False)
    return EXIT_OK


class _CompareProgress:
    """Progress of a comparison: a rich bar on a terminal, otherwise one line per round with an ETA."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.trained = 0  # rounds trained in this invocation (the ETA's basis; stored cells cost nothing)
        self.started = time.monotonic()
        self.bar: Progress | None = None
        self.task: Any = None
        if console.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                                TextColumn("{task.fields[status]}"), console=console)

    def __enter__(self) -> _CompareProgress:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("rounds", total=self.total, status="", eta="?")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _eta(self) -> str:
        if self.trained == 0:
            return "?"
        left = (time.monotonic() - self.started) / self.trained * (self.total - self.done)
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def _show(self, status: str, advance: int) -> None:
        self.done += advance
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, status=status, eta=self._eta())
        else:
            self.console.print(f"[{self.done}/{self.total} rounds, ETA {self._eta()}] {status}",
                               markup=False, highlight=False)

    def round_done(self, row: CompareRow) -> None:
        self.trained += 1
        self._show(f"{row.strategy} k={row.ratio:g} seed {row.seed} round {row.round}: acc {row.accuracy:.3f}", 1)

    def cell_skipped(self, strategy: str, ratio: float, seed: int, rounds: int) -> None:
        self._show(f"{strategy} k={ratio:g} seed {seed}: finished before, taken from cells/", rounds)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `testbed` console script; returns the exit code."""
    args = _parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except TestbedError as error:  # every package's error family is rooted here: one line, no traceback
        Console(stderr=True).print(f"[red]error:[/] {error}", highlight=False)
        return EXIT_BAD_SCENARIO if isinstance(error, ScenarioError) else EXIT_RUN_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in COMMAND_MODULES:
        return int(importlib.import_module(COMMAND_MODULES[args.command]).run(args))
    console = Console(soft_wrap=True)  # full lines: logs and CI read them, a terminal wraps them itself
    if args.command == "validate":
        return _command_validate(args, console)
    if args.command == "compare":
        return _command_compare(args, console)
    if args.command == "report":
        return _command_report(args, console)
    if args.command == "monitoring":
        return _command_monitoring(args, console)
    return _command_run(args, console)


if __name__ == "__main__":
    sys.exit(main())

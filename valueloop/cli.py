"""The `valueloop` command line: thin wrappers over :mod:`valueloop.jobs`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from valueloop import jobs, loaders, loop, transform
from valueloop.campaigns import CampaignSent
from valueloop.config import load_settings
from valueloop.ingest import IngestError
from valueloop.orchestration import DagRunFailed
from valueloop.quality import runner as quality
from valueloop.stack import StackError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write a seeded demo shop (Parquet) to a folder",
        description="Simulate a demo online shop: customers, products, orders "
        "and order lines with cancellations and returns, and reviews.",
    )
    p.add_argument("--customers", type=int, help="number of customers (default: config, 10000)")
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same shop")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: $VALUELOOP_HOME/landing/simulator/demo_shop)",
    )
    p.set_defaults(func=_cmd_generate)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="load a file or the simulator's folder into the warehouse's raw schema",
        description="Load into DuckDB schema `raw`. A file already loaded (same content) is "
        "skipped; each file is one batch, loaded whole or not at all; rows that do not parse "
        "go to raw.quarantine with the column and the reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", type=Path, help="file, or folder written by `valueloop generate`")
    p.add_argument(
        "--format",
        choices=loaders.FORMATS,
        default=None,
        help="input format (a folder defaults to simulator)",
    )
    g = p.add_argument_group("transactions format: column mapping and layout")
    g.add_argument("--customer-col", help="column with the customer id")
    g.add_argument("--timestamp-col", help="column with the purchase time")
    g.add_argument("--amount-col", help="column with the line amount (or quantity and price)")
    g.add_argument("--quantity-col", help="column with the quantity")
    g.add_argument("--price-col", help="column with the unit price")
    g.add_argument("--order-col", help="column with the order id (default: customer + time)")
    g.add_argument("--sku-col", help="column with the product code")
    g.add_argument("--description-col", help="column with the product description")
    g.add_argument("--country-col", help="column with the country")
    g.add_argument(
        "--delimiter",
        help="',', 'tab', 'whitespace' or any character "
        "(default: from the suffix: .tsv tab, .txt whitespace, else comma)",
    )
    g.add_argument("--no-header", action="store_true", help="the file has no header row")
    g.add_argument(
        "--names",
        help="comma-separated column names for a file without header "
        "(default column_1, column_2, ...)",
    )
    g.add_argument("--date-format", help="strftime format of the timestamps, e.g. %%Y%%m%%d")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the file")
    p.set_defaults(func=_cmd_ingest)


def _add_withdraw(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "withdraw",
        help="take a loaded batch back out of the raw tables, into the quarantine",
        description="When the raw checkpoint stops the pipeline on a batch that should not have "
        "been loaded (the message names it, and raw.ingest_batches lists every batch), this "
        "moves the batch's rows to raw.quarantine with the reason and lets the checkpoint pass "
        "over it; then land the corrected file and run the pipeline again. Nothing is deleted.",
    )
    p.add_argument("batch_id", help="the batch, e.g. order_lines-1a2b3c4d5e6f7a8b")
    p.add_argument("--reason", required=True, help="why: kept with every row in the quarantine")
    p.set_defaults(func=_cmd_withdraw)


def _add_transform(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transform",
        help="dbt build: staging, marts, ML features and labels, with their tests",
        description="Run `dbt build` on the warehouse (profile and vars from the config). "
        "Without --as-of, the ML marts use cutoffs derived from the data: labelled cutoffs "
        "30 days apart ending one horizon before the last day, plus the last day to score.",
    )
    p.add_argument(
        "--as-of",
        type=date.fromisoformat,
        action="append",
        metavar="DATE",
        help="a cutoff day (YYYY-MM-DD); repeat for several",
    )
    p.add_argument("--horizon-days", type=int, help="label horizon (default 90)")
    p.add_argument("--select", help="dbt node selection, e.g. marts.ml+")
    p.add_argument("--docs", action="store_true", help="also run `dbt docs generate`")
    p.set_defaults(func=_cmd_transform)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="run a data-quality checkpoint: raw, marts or scores (exit 1 on a critical failure)",
        description="Validate a boundary with Great Expectations: `raw` (the latest ingest "
        "batches), `marts` (before training and scoring) or `scores` (before publishing). "
        "Results go to quality.validation_results and to Data Docs. A critical failure exits "
        "1 naming the expectation, column and sample bad values; warnings are reported.",
    )
    p.add_argument("checkpoint", choices=quality.CHECKPOINTS)
    p.add_argument("--run-id", help="id to store the results under (default manual__<time>)")
    p.set_defaults(func=_cmd_check)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the transformer and the baselines, track them in MLflow, run the gate",
        description="Fine-tune the transformer (value tier and churn) and train LightGBM, "
        "BG/NBD and an RFM rule on the same time splits; log everything to MLflow; register "
        "the transformer as `challenger` and promote it to `champion` only if it beats the "
        "incumbent on the same frozen holdout.",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="YAML training config (default $VALUELOOP_TRAIN_CONFIG, else "
        "ml/configs/default.yaml; ml/configs/tiny.yaml trains in seconds)",
    )
    p.add_argument(
        "--model",
        choices=("sequence", "document"),
        help="the challenger: the behaviour-sequence transformer or the document transformer",
    )
    p.add_argument("--encoder", help="minilm, tiny-random, or a local checkpoint path")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--accumulate-grad-batches", type=int)
    p.add_argument("--max-train-rows", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_train)


def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="point the `champion` alias at a model version (rollback)",
        description="Roll back or forward: make version N of "
        "the registered model the champion that scoring loads.",
    )
    p.add_argument("--version", required=True, help="registered model version")
    p.add_argument("--model", help="registered model name (default from the training config)")
    p.set_defaults(func=_cmd_promote)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score every customer with the champion; segment; validate; publish for BI",
        description="Load models:/<name>@champion, score marts.scoring_set in batches, segment "
        "the embeddings, add next best actions, run the scores checkpoint, then publish "
        "marts.customer_scores, marts.segment_summary and marts.customer_scores_history in one "
        "transaction (a failed run leaves the published scores untouched). Writes a BI "
        "snapshot (Parquet files and exports/current/bi.duckdb, views over them) and an HTML "
        "report.",
    )
    p.add_argument(
        "--run-id",
        help="scoring run id (default manual__<time>); re-running an id replaces its history rows",
    )
    p.add_argument("--batch-rows", type=int, default=20_000, help="customers per chunk read")
    p.add_argument("--batch-size", type=int, default=256, help="customers per model batch")
    p.set_defaults(func=_cmd_score)


def _add_bi_rollback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bi-rollback",
        help="point BI tools back at the previous BI snapshot",
        description="Swap exports/current and exports/previous: BI tools reading "
        "exports/current/bi.duckdb see the snapshot before the last publish (run it again to "
        "roll forward). The warehouse is not touched.",
    )
    p.set_defaults(func=_cmd_bi_rollback)


def _add_stack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack",
        help="the production topology without Docker: Postgres, Redis, Celery, MLflow server",
        description="Start, on this machine, what docker-compose.yml runs: a Postgres server "
        "(Airflow's metadata and MLflow's store), Redis, Airflow's API server, scheduler, DAG "
        "processor and triggerer with the CeleryExecutor and N workers, and an MLflow server. "
        "`up` keeps it running until Ctrl-C; `run` generates the demo shop if none is landed, "
        "triggers ingest_and_transform through the REST API, waits for the asset-triggered "
        "training and scoring, and stops everything; it turns the DAGs' time schedules off "
        "(`up` keeps them). Service logs: $VALUELOOP_HOME/stack/logs.",
    )
    p.add_argument("action", choices=("up", "run"))
    p.add_argument("--workers", type=int, default=2, help="Celery workers")
    p.set_defaults(func=_cmd_stack)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the main job on the demo shop, through the Airflow DAGs",
        description="Generate the demo shop and run the pipeline through the Airflow DAGs: one "
        "line per stage with its time, tool output in log files under VALUELOOP_HOME/logs, and "
        "a summary at the end (data loaded, checks, champion, BI tables, the UIs).",
    )
    p.add_argument("--customers", type=int, help="number of demo customers")
    p.add_argument("--seed", type=int, help="random seed of the demo shop")
    p.add_argument(
        "--train-config",
        type=Path,
        help="training config (default $VALUELOOP_TRAIN_CONFIG, else ml/configs/default.yaml)",
    )
    p.add_argument(
        "--no-airflow",
        action="store_true",
        help="run the steps directly instead of through the Airflow DAGs",
    )
    p.add_argument(
        "--cycles",
        type=int,
        default=2,
        help="turns of the loop after the first scoring (campaign, market, feedback, "
        "retraining, rescoring); default 2",
    )
    p.add_argument(
        "--verbose",
        dest="verbose_run",
        action="store_true",
        help="show every tool's output (pip, Airflow, dbt, Lightning) instead of the log files",
    )
    p.set_defaults(func=_cmd_run)


def _add_campaign(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "campaign",
        help="plan a campaign with control groups; play the demo market through one",
        description="plan: turn the published scores into a campaign (marts.campaign_assignments"
        ", randomised control groups, budget and eligibility from the settings and the dbt seed "
        "campaign_actions) and export it to exports/campaigns/<id>.csv and .parquet. simulate: "
        "the demo shop's market answers a campaign (new order lines, an outcome file in "
        "landing/feedback/campaign_outcomes).",
    )
    p.add_argument("action", choices=["plan", "simulate"])
    p.add_argument(
        "--campaign-id",
        help="default: cmp-<as_of> (plan); the --file's campaign, else the latest (simulate)",
    )
    p.add_argument(
        "--file",
        type=Path,
        help="simulate: the campaign file to answer (default: the exported "
        "exports/campaigns/<id>.parquet; .csv works too)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="plan: plan a campaign that was planned before afresh (without it, planning the "
        "same campaign again returns it as it was exported); refused once outcomes came back",
    )
    p.set_defaults(func=_cmd_campaign)


def _add_uplift(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "uplift",
        help="train and gate the uplift model on the randomised campaign outcomes",
        description="Incremental orders per cell of customers against their randomised "
        "controls (with standard errors), evaluated by Qini/AUUC on a fixed holdout and "
        "logged to MLflow (experiment valueloop-uplift). Its policy is weighed against the "
        "champion's (the first model: the playbook's) on the held-out outcomes of campaigns "
        "the champion did not learn from, and it is "
        "promoted unless it loses beyond the noise (VALUELOOP_UPLIFT_GATE=guardrail) or only "
        "on a gain beyond it (superiority).",
    )
    p.set_defaults(func=_cmd_uplift)


def _add_loop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loop",
        help="run more turns of the loop on the demo shop",
        description="Each cycle: the demo market answers the latest campaign, orders and "
        "outcomes are ingested and checked, dbt rebuilds, the retraining triggers are "
        "evaluated (and models retrained and gated), customers are rescored and the next "
        "campaign is planned. Prints what each campaign measured.",
    )
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument(
        "--verbose",
        dest="verbose_run",
        action="store_true",
        help="show every tool's output (default: one line per cycle, the output in a log)",
    )
    p.set_defaults(func=_cmd_loop)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="rolling-origin backtest of every model over several cutoffs",
        description="Train and evaluate every model at each of the latest labelled cutoffs of "
        "marts.training_set, each trained only on cutoffs whose labels were known by then; "
        "metrics per cutoff and averaged, with bootstrap 95%% intervals and paired "
        "differences against the best baseline; logged to MLflow (experiment "
        "valueloop-backtest) and written to reports/backtest/.",
    )
    p.add_argument(
        "--backtest",
        action="store_true",
        required=True,
        help="roll the evaluation over cutoffs (the only mode for now)",
    )
    p.add_argument("--cutoffs", type=int, default=4, help="evaluation cutoffs (default 4)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=500,
        help="bootstrap resamples of the customers, drawn once for all cutoffs (default 500)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        help="default: lightgbm lightgbm_rfm bg_nbd rfm_rule ensemble transformer stack",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--config",
        type=Path,
        help="training config that sizes the transformer (default $VALUELOOP_TRAIN_CONFIG, else "
        "ml/configs/default.yaml)",
    )
    p.add_argument(
        "--max-rows-per-cutoff",
        type=int,
        default=None,
        help="customers read per cutoff, an md5 draw stratified by value tier (default "
        "ml.backtest.MAX_ROWS_PER_CUTOFF, 100000; 0: every customer): bounds memory by the "
        "cutoffs times this",
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ml import backtest
    from ml.config import TrainConfig

    settings = load_settings()
    result = backtest.run(
        settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        n_cutoffs=args.cutoffs,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        models=tuple(args.models) if args.models else None,
        out_dir=settings.home / "reports" / "backtest",
        cfg=TrainConfig.load(args.config or settings.train_config),
        cache_dir=settings.home / "cache",
        max_rows_per_cutoff=(
            backtest.MAX_ROWS_PER_CUTOFF
            if args.max_rows_per_cutoff is None
            else args.max_rows_per_cutoff or None
        ),
    )
    print(result.summary())
    print(f"tables and plot: {settings.home / 'reports' / 'backtest'}")
    return 0


def _cmd_campaign(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "plan":
        from valueloop.campaigns import plan

        print(plan(settings, args.campaign_id, replace=args.replace).summary())
    else:
        from valueloop.loop import simulate_campaign

        print(simulate_campaign(settings, args.campaign_id, args.file).summary())
    return 0


def _cmd_uplift(args: argparse.Namespace) -> int:
    from valueloop import pipeline

    print(pipeline.train_uplift(load_settings())["summary"])
    return 0


def _cmd_loop(args: argparse.Namespace) -> int:
    """As ``valueloop run`` shows its turns of the loop: a line per cycle while it runs, the
    tools' output (GX, dbt, MLflow, progress bars) in a log, then what each cycle measured."""
    from valueloop import run_summary
    from valueloop.terminal import StageBoard, tool_output_to

    settings = load_settings()
    console, logs = _terminal(settings, "loop", datetime.now(UTC))
    quiet = not (args.verbose or args.verbose_run)
    try:
        with StageBoard(console) as board, tool_output_to(logs / "valueloop.log", quiet):
            cycles = loop.run_cycles(settings, args.cycles, board)
    except Exception:
        console.print(f"[red]stopped.[/] The tools' output is in {logs}/", soft_wrap=True)
        raise
    run_summary.render_loop(console, cycles)
    return 0


def _add_airflow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "airflow",
        help="start `airflow standalone` with the project's DAGs",
        description="Bootstrap Airflow (SQLite metadata under the home folder, "
        "the warehouse pool, the dbt manifest) and start `airflow standalone`; "
        "prints the UI address and the login.",
    )
    p.set_defaults(func=_cmd_airflow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valueloop",
        description="ValueLoop: customer intelligence for e-commerce. Settings come from "
        "VALUELOOP_* environment variables; everything lives under VALUELOOP_HOME (./data).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_ingest(sub)
    _add_withdraw(sub)
    _add_transform(sub)
    _add_check(sub)
    _add_train(sub)
    _add_promote(sub)
    _add_score(sub)
    _add_bi_rollback(sub)
    _add_stack(sub)
    _add_run(sub)
    _add_campaign(sub)
    _add_uplift(sub)
    _add_loop(sub)
    _add_evaluate(sub)
    _add_airflow(sub)
    return parser


def _cmd_generate(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(jobs.generate_demo(settings, args.customers, args.seed, args.out))
    return 0


def _mapping_from_args(args: argparse.Namespace) -> loaders.TransactionsMapping | None:
    if args.format != "transactions":
        return None
    if not args.customer_col or not args.timestamp_col:
        raise ValueError("the transactions format needs --customer-col and --timestamp-col")
    return loaders.TransactionsMapping(
        customer_col=args.customer_col,
        timestamp_col=args.timestamp_col,
        amount_col=args.amount_col,
        quantity_col=args.quantity_col,
        price_col=args.price_col,
        order_col=args.order_col,
        sku_col=args.sku_col,
        description_col=args.description_col,
        country_col=args.country_col,
        delimiter=args.delimiter,
        header=not args.no_header,
        names=tuple(n.strip() for n in args.names.split(",")) if args.names else (),
        date_format=args.date_format,
        encoding=args.encoding,
    )


def _cmd_ingest(args: argparse.Namespace) -> int:
    if args.format is None:
        if not args.path.is_dir():
            raise ValueError(
                f"{args.path}: say which --format it is ({', '.join(loaders.FORMATS)})"
            )
        args.format = "simulator"
    settings = load_settings()
    report = jobs.ingest_path(settings, args.path, args.format, _mapping_from_args(args))
    print(report.summary())
    print(f"warehouse: {settings.warehouse_path}")
    return 0


def _cmd_withdraw(args: argparse.Namespace) -> int:
    withdrawal, exported = jobs.withdraw(load_settings(), args.batch_id, args.reason)
    print(withdrawal.summary())
    if exported:
        print(f"the batch's quarantined rows: {exported}")
    return 0


def _cmd_transform(args: argparse.Namespace) -> int:
    settings = load_settings()
    result = transform.build(settings, args.as_of, args.horizon_days, args.select)
    print(result.summary())
    if args.docs:
        print(f"dbt docs: {transform.docs(settings) / 'index.html'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    report = quality.run_checkpoint(load_settings(), args.checkpoint, args.run_id)
    print(report.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ml.config import TrainConfig
    from ml.train import train

    settings = load_settings()
    config = TrainConfig.load(
        args.config or settings.train_config,
        model=args.model,
        encoder=args.encoder,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        accumulate_grad_batches=args.accumulate_grad_batches,
        max_train_rows=args.max_train_rows,
        seed=args.seed,
    )
    report = train(
        config,
        settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        settings.home / "cache",
    )
    print(report.summary())
    print(f"compare runs: make mlflow-ui (tracking store {settings.mlflow_tracking_uri})")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from ml.config import TrainConfig
    from ml.registry import promote

    settings = load_settings()
    name = args.model or TrainConfig.load(settings.train_config).registered_model
    previous = promote(settings.mlflow_tracking_uri, name, args.version)
    print(f"{name}: champion is now version {args.version} (was {previous})")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from ml.score import score

    settings = load_settings()
    run_id = args.run_id or quality.default_run_id()
    print(score(settings, run_id, batch_rows=args.batch_rows, batch_size=args.batch_size).summary())
    return 0


def _cmd_bi_rollback(args: argparse.Namespace) -> int:
    from valueloop import bi_snapshot

    exports = load_settings().exports_dir
    print(f"BI tools now read {bi_snapshot.rollback(exports)}")
    return 0


def _cmd_stack(args: argparse.Namespace) -> int:
    from valueloop import stack

    def stop_on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the stop must not be cut short
        raise KeyboardInterrupt  # so that every service is stopped on the way out

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    settings = load_settings()
    if args.action == "run" and not settings.demo_dir.exists():
        print(jobs.generate_demo(settings))
    one_shot = args.action == "run"  # the triggered run only: no scheduled runs beside it
    with stack.Stack(settings, workers=args.workers, schedules=not one_shot) as running:
        print(stack.describe(running), flush=True)
        if args.action == "up":
            print("Ctrl-C stops every service.", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                return 0
        runs = running.run_pipeline()
        print(stack.summary_json(runs, running))
    return 0


def _terminal(settings, kind: str, started: datetime, title: str | None = None):
    """A console on a copy of the terminal (the tools' output may be sent to a log) and the
    folder of this command's logs, ``<kind>-<started>``, which it names after ``title``."""
    from rich.console import Console

    settings.ensure_dirs()
    logs = settings.logs_dir / f"{kind}-{started:%Y%m%dT%H%M%S}"
    logs.mkdir(parents=True, exist_ok=True)
    console = Console(file=os.fdopen(os.dup(sys.stdout.fileno()), "w"), highlight=False)
    if title:
        console.print(title)
    console.print(f"[dim]tool output: {logs}/[/]", soft_wrap=True)
    return console, logs


def _cmd_run(args: argparse.Namespace) -> int:
    from valueloop import orchestration, run_summary
    from valueloop.quietly import format_duration
    from valueloop.terminal import StageBoard, tool_output_to

    if args.train_config:
        os.environ["VALUELOOP_TRAIN_CONFIG"] = str(args.train_config.resolve())
    settings = load_settings()
    verbose = args.verbose or args.verbose_run
    started = datetime.now(UTC)
    console, logs = _terminal(
        settings, "run", started, "[bold]ValueLoop[/]: the demo shop end to end"
    )
    try:
        with (
            StageBoard(console) as board,
            tool_output_to(logs / "valueloop.log", enabled=not verbose),
        ):
            with board.stage("generate"):
                shop = jobs.generate_demo(settings, args.customers, args.seed, keep_existing=True)
                board.update(
                    "generate", f"{shop.customers:,} customers, {shop.order_lines:,} order lines"
                )
            if args.no_airflow:
                _run_directly(settings, args.train_config, board)
            else:
                with board.stage("airflow setup", "metadata DB, pool, dbt manifest"):
                    orchestration.bootstrap(settings)
                orchestration.run_dags(settings, board, logs, verbose=verbose)
            cycles = loop.run_cycles(settings, args.cycles, board)
    except Exception:
        console.print(f"[red]stopped.[/] The tools' output is in {logs}/", soft_wrap=True)
        raise
    with tool_output_to(logs / "valueloop.log", enabled=not verbose):
        summary = run_summary.collect(settings, started)
    run_summary.render(console, summary, settings, logs)
    run_summary.render_loop(console, cycles)
    took = format_duration((datetime.now(UTC) - started).total_seconds())
    console.print(f"[bold green]Done[/] in {took}.")
    return 0


def _run_directly(settings, train_config: Path | None, board) -> None:
    """The same steps without Airflow, one after the other."""
    from ml.config import TrainConfig
    from ml.score import score
    from ml.train import train

    run_id = quality.default_run_id()
    with board.stage("ingest"):
        report = jobs.ingest_path(settings, settings.demo_dir, "simulator")
        board.update(
            "ingest", f"{report.rows_accepted:,} accepted, {report.rows_quarantined:,} quarantined"
        )
    with board.stage("raw checks"):
        quality.run_checkpoint(settings, "raw", run_id)
    with board.stage("dbt build"):
        transform.build(settings)
    with board.stage("marts checks"):
        quality.run_checkpoint(settings, "marts", run_id)
    with board.stage("train + gate"):
        config = TrainConfig.load(train_config or settings.train_config)
        train(
            config,
            settings.warehouse_path,
            settings.mlflow_tracking_uri,
            settings.mlflow_artifacts_dir,
            settings.home / "cache",
        )
    with board.stage("score + publish"):
        score(settings, run_id, config)
    with board.stage("plan campaign") as stage:
        from valueloop.campaigns import plan

        try:
            plan(settings)
        except CampaignSent as sent:  # as the DAG: its outcomes came back, it stays as sent
            stage.update("plan campaign", str(sent))


def _cmd_airflow(args: argparse.Namespace) -> int:
    from valueloop import orchestration

    return orchestration.standalone(load_settings())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (
        IngestError,
        transform.TransformError,
        quality.QualityError,
        LookupError,
        ValueError,
        FileNotFoundError,
        DagRunFailed,
        StackError,
        CampaignSent,
    ) as error:
        print(f"valueloop {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

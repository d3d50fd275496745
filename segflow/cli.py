"""`segflow`: the single command line entry point (CONTRACT §8)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from compiler.errors import DefinitionError
from segflow.db import connect, fetch_one

app = typer.Typer(help="Real-time user segmentation for trading CRMs, inside PostgreSQL.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database lifecycle.", no_args_is_help=True)
app.add_typer(db_app, name="db")
deliveries_app = typer.Typer(help="Deliveries of segment actions.", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")
console = Console()

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "segments"


def _url() -> str:
    from segflow.cluster import database_url

    return database_url()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations (running it twice is a no-op)."""
    from segflow.migrate import upgrade

    upgrade(_url())
    console.print("database is up to date")


@app.command("apply")
def apply_cmd(
    paths: Annotated[list[Path], typer.Argument(help="definition files or directories")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and show the plan")] = False,
) -> None:
    """Validate, compile and install segment, score and destination definitions."""
    from segflow.install import apply

    try:
        with connect(_url()) as conn, Progress(
            # A segment's profiles are evaluated in one pass: the elapsed time shows it working.
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=True,
        ) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(f"evaluating {name}", total=total)
                bar.update(tasks[name], completed=done)

            plan = apply(conn, paths, dry_run=dry_run, progress=progress)
    except DefinitionError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    for line in plan.lines():
        console.print(line, highlight=False)
    verb = "would write" if dry_run else "wrote"
    console.print(f"{verb} {plan.transitions} transitions" + (" (dry run)" if dry_run else ""))


@app.command("preview")
def preview_cmd(
    path: Path,
    sample: Annotated[int, typer.Option(help="members to show")] = 10,
) -> None:
    """Evaluate a definition on existing data without installing it."""
    from segflow.install import preview

    try:
        with connect(_url()) as conn:
            result = preview(conn, path, sample=sample)
    except DefinitionError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{result.name}: {result.size} of {result.profiles} profiles would be members")
    table = Table("profile_id", "context")
    for row in result.sample:
        table.add_row(str(row["profile_id"]), str(row["context"]))
    console.print(table)


@app.command("tick")
def tick_cmd() -> None:
    """Run segflow.tick() once."""
    with connect(_url(), autocommit=True) as conn:
        console.print(f"{fetch_one(conn, 'tick_now')['n']} transitions")


@app.command("api")
def api_cmd(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    from api.server import serve

    serve(host, port, _url())


@app.command("worker")
def worker_cmd(
    tick_interval: Annotated[float, typer.Option(help="seconds between ticks")] = 1.0,
    poll_interval: Annotated[float, typer.Option(
        help="longest wait for new deliveries without a notification, in seconds")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="deliveries sent at once")] = 16,
    lease: Annotated[float, typer.Option(
        help="seconds after a destination's timeout before another worker may take over a "
        "delivery this one claimed (if it died)")] = 30.0,
) -> None:
    """Deliver segment actions to destinations, and run segflow.tick() every second (only
    one of several workers ticks)."""
    import logging

    from api.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    try:
        run_worker(_url(), stop, tick_interval=tick_interval, poll_interval=poll_interval,
                   concurrency=concurrency, lease=lease)
    except KeyboardInterrupt:
        stop.set()


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int | None, typer.Argument(help="a dead delivery's id")] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="replay every dead delivery")]
    = False,
) -> None:
    """Replay dead deliveries (same X-Segflow-Delivery key as before)."""
    from api.worker import retry_dead

    if (delivery_id is None) == (not all_dead):
        console.print("[red]error:[/red] give a delivery id or --all-dead", highlight=False)
        raise typer.Exit(2)
    n = retry_dead(_url(), None if all_dead else delivery_id)
    if delivery_id is not None and n == 0:
        console.print(f"[red]error:[/red] delivery {delivery_id} is not dead", highlight=False)
        raise typer.Exit(1)
    console.print(f"{n} deliveries queued again")


def receive_webhooks(stop: threading.Event, port: int = 8080) -> None:
    """The demo's webhook receiver: examples/webhook_receiver.py, its output in a log file."""
    from segflow.cluster import segflow_data_dir

    # In the user's own data directory: a shared temp file may belong to another user.
    log = segflow_data_dir() / "demo-webhooks.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, subprocess.Popen(
        [sys.executable, str(EXAMPLES.parent / "webhook_receiver.py"), "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT,
    ) as receiver:
        stop.wait()
        receiver.terminate()


@app.command("demo")
def demo_cmd(
    rate: Annotated[float, typer.Option(help="events per second")] = 20.0,
    duration: Annotated[float | None, typer.Option(help="seconds; default until Ctrl-C")] = None,
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The main job: database, migrations, example segments, a live trader feed, tick, API."""
    from api.worker import run_worker
    from segflow.demo import ThreadComponent, run_demo
    from segflow.install import apply
    from segflow.migrate import upgrade

    url = _url()
    console.print(f"database: {url}")
    upgrade(url)

    def install() -> None:
        # After the history: new segments are backfilled over it, scheduled ones included.
        with connect(url) as conn:
            plan = apply(conn, [EXAMPLES])
        console.print(f"segments: {', '.join(plan.new + plan.changed + plan.unchanged)}")

    # The example destinations post to a local receiver that checks the signatures.
    os.environ.setdefault("SEGFLOW_ACCOUNT_REVIEW_SECRET", "demo-secret")
    os.environ.setdefault("SEGFLOW_ACQUISITION_ADS_SECRET", "demo-secret")
    components = [ThreadComponent("receiver", receive_webhooks),
                  ThreadComponent("worker", lambda stop: run_worker(url, stop))]

    def serve_api(stop: threading.Event) -> None:
        import uvicorn

        from api.app import create_app

        server = uvicorn.Server(uvicorn.Config(create_app(url, stop=stop), host="127.0.0.1",
                                               port=port, log_level="warning"))
        def stop_server() -> None:
            stop.wait()
            server.should_exit = True

        threading.Thread(target=stop_server, daemon=True).start()
        server.run()

    components.append(ThreadComponent("api", serve_api))
    console.print(f"API: http://127.0.0.1:{port}/docs  —  try in psql: "
                  "SELECT * FROM segments.margin_call_risk;")
    run_demo(url, rate=rate, duration=duration, seed=seed, install=install,
             components=components, console=console)
    time.sleep(0.1)


@app.command("bench")
def bench_cmd(
    scenario: Annotated[str, typer.Argument(
        help="ingest, writers, latency, tick, history, backfill, matview or all")],
    scale: Annotated[str, typer.Option(help="small (seconds), medium (minutes), full")] = "medium",
    output: Annotated[Path | None, typer.Option(help="markdown file for the figures")] = Path(
        "BENCHMARKS.md"),
    max_load: Annotated[float | None, typer.Option(
        help="wait (up to 20 minutes) until the 1-minute load average is below this")] = None,
) -> None:
    """Run benchmarks in a scratch database `segflow_bench` on the configured server."""
    import bench

    names = list(bench.SCENARIOS) if scenario == "all" else [scenario]
    chosen = next((s for s in bench.SCALES if s == scale), None)
    if any(n not in bench.SCENARIOS for n in names) or chosen is None:
        console.print(f"[red]error:[/red] scenario is one of {', '.join(bench.SCENARIOS)}, all;"
                      f" scale one of {', '.join(bench.SCALES)}", highlight=False)
        raise typer.Exit(2)
    bench.run(names, chosen, _url(), output, console, max_load=max_load)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

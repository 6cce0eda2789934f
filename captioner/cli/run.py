"""`captioner run` (the whole stack on one machine; `make run`) and `captioner serve` (the
dashboard alone, on werkzeug's threaded server; deployments use gunicorn instead).

Registered into the main CLI by `captioner.cli._register()`. Options override the matching
`CAPTIONER_*` settings for this command and every process it starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _override(name: str, value) -> None:
    if value is not None:
        os.environ[name] = str(value)


@click.command("run")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the database, objects, models and logs live (CAPTIONER_DATA_DIR).",
)
@click.option("--host", default=None, help="Dashboard address (CAPTIONER_DASHBOARD_HOST).")
@click.option("--port", type=int, default=None, help="Dashboard port (CAPTIONER_DASHBOARD_PORT).")
@click.option(
    "--redis-port",
    type=int,
    default=None,
    help="Port of the private Redis (CAPTIONER_EMBEDDED_REDIS_PORT).",
)
@click.option(
    "--model-checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Caption with this checkpoint instead of the demo model (no training).",
)
@click.option(
    "--untrained",
    is_flag=True,
    help="Skip training: caption with a freshly initialised tiny model (noise; fast).",
)
@click.option("--no-sample", is_flag=True, help="Do not submit the bundled sample collection.")
@click.pass_context
def run(ctx, data_dir, host, port, redis_port, model_checkpoint, untrained, no_sample):
    """Run everything on this machine: a private Redis, SQLite, a local object store, the
    dashboard, a caption worker, a maintenance worker and beat. Prints the admin login and the
    URL; Ctrl-C stops it all."""
    _override("CAPTIONER_DATA_DIR", data_dir)
    _override("CAPTIONER_DASHBOARD_HOST", host)
    _override("CAPTIONER_DASHBOARD_PORT", port)
    _override("CAPTIONER_EMBEDDED_REDIS_PORT", redis_port)
    if model_checkpoint is None and os.environ.get("CAPTIONER_MODEL_CHECKPOINT"):
        model_checkpoint = Path(os.environ["CAPTIONER_MODEL_CHECKPOINT"])
    from captioner.cli.stack import StackError, StackOptions, run_stack
    from captioner.settings import get_settings, reset_settings

    reset_settings()
    try:
        settings = get_settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid setting: {exc}") from None
    options = StackOptions(
        checkpoint=model_checkpoint,
        untrained=untrained,
        can_train="train" in ctx.find_root().command.commands,
        submit_sample=not no_sample,
    )
    try:
        code = run_stack(settings, options, echo=lambda line: click.echo(line))
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on (CAPTIONER_DASHBOARD_HOST).")
@click.option(
    "--port", type=int, default=None, help="Port to listen on (CAPTIONER_DASHBOARD_PORT)."
)
def serve(host, port):
    """Serve the dashboard with werkzeug's threaded server (one machine; use gunicorn to deploy)."""
    from werkzeug.serving import run_simple

    from captioner.logging import configure_logging
    from captioner.settings import get_settings
    from dashboard import InsecureSecretKey, create_app

    try:
        settings = get_settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid setting: {exc}") from None
    configure_logging(settings)
    try:
        app = create_app(settings)
    except InsecureSecretKey as exc:
        raise click.ClickException(str(exc)) from None
    run_simple(
        host or settings.dashboard_host,
        port or settings.dashboard_port,
        app,
        threaded=True,
        use_reloader=False,
        use_debugger=False,
    )

"""`captioner model list|register|promote|rollback` and `captioner retrain [--now] [--inline]`.

These are operator commands that talk to the database (CAPTIONER_DATABASE_URL) directly, like
`captioner db`. A promotion or rollback reaches the workers on their next batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _engine(url: str | None):
    from captioner.state.db import make_engine

    return make_engine(url)


@click.group("model")
def model() -> None:
    """Model versions: list, register a checkpoint, promote, roll back."""


@model.command("list")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
def model_list(url, as_json):
    """Model versions, newest first (the active one marked with *)."""
    from captioner.learning import registry
    from captioner.state.db import session_scope

    engine = _engine(url)
    try:
        with session_scope(engine) as session:
            versions = registry.list_versions(session)
            if not versions:
                click.echo("no model versions")
            for v in versions:
                i = registry.info(v)
                if as_json:
                    click.echo(
                        json.dumps(
                            {
                                **i.__dict__,
                                "created_at": str(i.created_at),
                                "promoted_at": str(i.promoted_at),
                                "retired_at": str(i.retired_at),
                            },
                            default=str,
                        )
                    )
                    continue
                holdout = (i.metrics.get("holdout") or {}).get("exact_match")
                score = f"held-out exact {holdout:.3f}" if isinstance(holdout, float) else ""
                mark = "*" if i.status == "active" else " "
                click.echo(
                    f"{mark} {i.id:>4}  {i.name:<28} {i.status:<9} parent={i.parent_id or '-'}  {score}"
                )
    finally:
        engine.dispose()


@model.command("register")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Version name (letters, digits, '.', '_', '-').")
@click.option("--promote", "then_promote", is_flag=True, help="Make it the active version too.")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def model_register(checkpoint, name, then_promote, url):
    """Upload CHECKPOINT to the object store and register it as a model version."""
    from captioner.learning import registry
    from captioner.settings import get_settings
    from captioner.state.db import session_scope
    from captioner.storage import open_store

    settings = get_settings()
    engine = _engine(url)
    try:
        with session_scope(engine) as session:
            version = registry.register(
                session, checkpoint, name=name, store=open_store(settings.storage_url, settings)
            )
            if then_promote:
                registry.promote(session, version.id)
            click.echo(
                f"registered {version.name} (id {version.id}) at {version.checkpoint_uri}"
                + (" and made it active" if then_promote else "")
            )
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


@model.command("promote")
@click.argument("name")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def model_promote(name, url):
    """Make version NAME (or id) the active one; the old one is retired."""
    from captioner.learning import registry

    version = _registry_change(url, lambda session: registry.promote(session, name))
    click.echo(f"{version.name} (id {version.id}) is now active")


@model.command("rollback")
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def model_rollback(url):
    """Re-activate the active version's parent (or the previously active version)."""
    from captioner.learning import registry

    version = _registry_change(url, registry.rollback)
    click.echo(f"rolled back: {version.name} (id {version.id}) is active again")


def _registry_change(url, change):
    """Run `change(session)` (promote / rollback) in one committed transaction; a RegistryError
    becomes one readable line. Returns the version it made active."""
    from captioner.learning import registry
    from captioner.state.db import session_scope

    engine = _engine(url)
    try:
        with session_scope(engine) as session:  # objects stay readable after the commit
            return change(session)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


@click.command("retrain")
@click.option("--now", is_flag=True, help="Start a run even below min_new_reviews.")
@click.option(
    "--inline",
    is_flag=True,
    help="Train in this process instead of sending the run to the train queue.",
)
@click.option("--url", default=None, help="Database URL (default: CAPTIONER_DATABASE_URL).")
def retrain_cmd(now, inline, url):
    """Start a training run if one is due (like the nightly beat tick), or now with --now."""
    from captioner import tasks
    from captioner.learning import retrain, runs
    from captioner.settings import get_settings
    from captioner.state.db import make_sessionmaker, session_scope

    settings = get_settings()
    engine = _engine(url)
    sessions = make_sessionmaker(engine)
    try:
        try:
            with session_scope(sessions) as session:
                run = runs.maybe_start_run(session, settings, force=now, trigger="cli")
                run_id = run.id if run is not None else None
        except (runs.RunAlreadyOpen, runs.NothingToTrain) as exc:
            raise click.ClickException(str(exc)) from None
        if run_id is None:
            click.echo(
                f"no run started (fewer than {settings.min_new_reviews} new reviews, or a "
                "run is already open); --now starts one anyway"
            )
            return
        if inline:
            click.echo(f"training run {run_id} started here")
            status = retrain.execute_run(sessions, run_id, settings, on_log=click.echo)
            with session_scope(sessions) as session:
                from captioner.state.models import TrainingRun

                row = session.get(TrainingRun, run_id)
                reason = (row.metrics or {}).get("gate", {}).get("reason") or row.error or ""
            click.echo(f"run {run_id}: {status}. {reason}")
            if status == "failed":
                raise SystemExit(1)
            return
        with session_scope(sessions) as session:
            runs.runs_to_dispatch(session, settings)
        tasks.publish_train_run(run_id, settings)
        click.echo(f"training run {run_id} queued on the train queue")
    finally:
        engine.dispose()

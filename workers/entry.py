"""Entry module for `celery -A workers.entry worker|beat` (the `captioner worker` command uses it)."""

from workers.celery_app import create_celery_app

app = create_celery_app()

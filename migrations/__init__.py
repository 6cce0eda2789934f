"""Captioner's Alembic environment, shipped inside the wheel as the package `migrations`.

`captioner.state.migrate` finds `env.py`, `alembic.ini`, `script.py.mako` and `versions/`
through this package (`importlib.resources`), so `captioner db upgrade` works from an installed
wheel as well as from the source tree. Nothing here is imported at run time except by Alembic.
"""

"""The Models page says what is serving (a checkpoint from settings counts) and offers "Roll
back" only when there is something to roll back to."""

from __future__ import annotations

import pytest

from captioner.learning import registry
from captioner.state.db import session_scope
from tests.dashboard_helpers import login, make_user
from tests.workers_fixtures import write_checkpoint


@pytest.fixture
def admin_client(app, client):
    client.admin = make_user(app, "admin@example.com", "admin")
    login(client, "admin@example.com")
    return client


def _settings_checkpoint(app):
    settings = app.extensions["captioner"].settings
    return write_checkpoint(settings.model_checkpoint, seed=0)


def test_nothing_serving_and_nothing_to_roll_back(app, admin_client):
    page = admin_client.get("/models").get_data(as_text=True)
    assert "Serving now:" in page and "no model" in page
    assert "Roll back" not in page
    listed = admin_client.get("/api/v1/models", headers=admin_client.admin.headers).json
    assert listed["serving_id"] is None and listed["serving_source"] == "none"
    assert listed["can_roll_back"] is False


def test_a_checkpoint_from_settings_is_serving_and_labelled_so(app, admin_client):
    checkpoint = _settings_checkpoint(app)
    page = admin_client.get("/models").get_data(as_text=True)
    assert "the checkpoint from settings" in page and str(checkpoint) in page
    assert "Roll back" not in page
    # Once a worker registered it (a candidate row), its row says it is serving.
    ext = app.extensions["captioner"]
    with session_scope(ext.sessionmaker) as s:
        name = registry.settings_checkpoint_name(checkpoint)
        version_id = registry.register(s, checkpoint, name=name, store=None).id
    page = admin_client.get("/models").get_data(as_text=True)
    assert "serving (checkpoint from settings)" in page and ">candidate<" not in page
    assert f"<strong>{name}</strong>" in page and "Roll back" not in page
    listed = admin_client.get("/api/v1/models", headers=admin_client.admin.headers).json
    assert listed["serving_id"] == version_id
    assert listed["serving_source"] == "settings_checkpoint" and listed["active_id"] is None


def test_the_active_version_serves_and_roll_back_names_its_target(app, admin_client, tmp_path):
    _settings_checkpoint(app)
    ext = app.extensions["captioner"]
    with session_scope(ext.sessionmaker) as s:
        v1 = registry.register(s, write_checkpoint(tmp_path / "a", seed=0), name="v1", store=None)
        registry.promote(s, v1.id)
        v2 = registry.register(
            s, write_checkpoint(tmp_path / "b", seed=1), name="v2", store=None, parent_id=v1.id
        )
        v2_id = v2.id
    page = admin_client.get("/models").get_data(as_text=True)
    assert "<strong>v1</strong>, the active version" in page and "Roll back" not in page
    with session_scope(ext.sessionmaker) as s:
        registry.promote(s, v2_id)
    page = admin_client.get("/models").get_data(as_text=True)
    assert "<strong>v2</strong>, the active version" in page and "Roll back to v1" in page
    assert "active, serving" in page
    listed = admin_client.get("/api/v1/models", headers=admin_client.admin.headers).json
    assert listed["serving_id"] == v2_id and listed["can_roll_back"] is True

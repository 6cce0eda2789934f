"""docker-compose.yml and the Dockerfile, checked without Docker (no engine on these machines):
every command names a real entry point with options it accepts, every CAPTIONER_* variable is a
real setting with a valid value, every dependency is healthy-checked or a one-shot that must
succeed, and the deployment has the parts the design asks for."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
import yaml

from captioner.cli import cli
from captioner.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETTINGS_ENV = {f"CAPTIONER_{name.upper()}" for name in Settings.model_fields}
# Third-party images run their own commands; ours are built from the Dockerfile.
OURS = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def substitute(value: str) -> str:
    """Compose's `${VAR:-default}` -> default, `${VAR:?msg}` / `${VAR}` -> a placeholder."""

    def one(m: re.Match) -> str:
        body = m.group(1)
        if ":-" in body:
            return body.split(":-", 1)[1]
        return "placeholder"

    return re.sub(r"\$\{([^}]*)\}", one, str(value))


def command_of(service: dict) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are exec-form lists"
    return [substitute(part) for part in command]


def check_captioner_command(argv: list[str]) -> None:
    """Resolve the subcommand in the click group and parse its options (nothing runs)."""
    command: click.Command = cli
    args = argv[1:]
    path = ["captioner"]
    while isinstance(command, click.Group):
        assert args, f"{' '.join(path)} needs a subcommand"
        name, args = args[0], args[1:]
        assert name in command.commands, f"`{' '.join(path)} {name}` is not a command"
        command = command.commands[name]
        path.append(name)
    # make_context parses (and validates) every option and argument without invoking.
    command.make_context(" ".join(path), list(args))


def check_celery_command(argv: list[str]) -> None:
    assert argv[1] == "-A", argv
    module = importlib.import_module(argv[2])
    from celery import Celery

    assert isinstance(module.app, Celery)
    assert argv[3] in ("worker", "beat", "flower", "inspect"), argv


def check_gunicorn_command(argv: list[str]) -> None:
    target = argv[-1]
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    factory = attr.removesuffix("()")
    assert callable(getattr(module, factory)), target
    if attr.endswith("()"):
        import inspect

        # gunicorn calls the factory with no arguments.
        params = inspect.signature(getattr(module, factory)).parameters.values()
        assert all(
            p.default is not p.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params
        )


@pytest.mark.parametrize("name", OURS)
def test_every_command_names_a_real_entry_point(name):
    argv = command_of(SERVICES[name])
    checks = {
        "captioner": check_captioner_command,
        "celery": check_celery_command,
        "gunicorn": check_gunicorn_command,
    }
    assert argv[0] in checks, f"{name}: unknown entry point {argv[0]}"
    checks[argv[0]](argv)


def test_a_bad_command_would_be_caught():
    with pytest.raises(AssertionError):
        check_captioner_command(["captioner", "no-such-command"])
    with pytest.raises(click.UsageError):
        check_captioner_command(["captioner", "worker", "--no-such-option"])
    with pytest.raises(ModuleNotFoundError):
        check_celery_command(["celery", "-A", "workers.no_such_module", "worker"])


def test_every_captioner_variable_is_a_setting_with_a_valid_value():
    seen: dict[str, dict[str, str]] = {}
    for name, svc in SERVICES.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        captioner_env = {k: substitute(v) for k, v in env.items() if k.startswith("CAPTIONER_")}
        unknown = set(captioner_env) - SETTINGS_ENV
        assert not unknown, f"{name}: not settings: {sorted(unknown)}"
        seen[name] = captioner_env
    assert all(seen[name] for name in OURS), "our services get their settings from the environment"
    for name in OURS:
        Settings(**{k.removeprefix("CAPTIONER_").lower(): v for k, v in seen[name].items()})
    dockerfile_env = set(re.findall(r"\b(CAPTIONER_[A-Z0-9_]+)=", DOCKERFILE))
    assert dockerfile_env and dockerfile_env <= SETTINGS_ENV, dockerfile_env - SETTINGS_ENV


def test_every_dependency_is_healthy_or_a_one_shot_that_succeeded():
    for name, svc in SERVICES.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on with conditions"
        for target, spec in depends.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], (
                    f"{target} has no healthcheck ({name} waits)"
                )
            else:
                assert condition == "service_completed_successfully", (
                    f"{name} -> {target}: {condition}"
                )
                assert SERVICES[target].get("restart") == "no", f"{target} is not a one-shot"
    # Every long-running service has a health check itself.
    for name, svc in SERVICES.items():
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_application_services_wait_for_the_migration_and_the_bucket():
    for name in ("dashboard", "worker-gpu0", "worker-train", "worker-maintenance", "beat"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["createbuckets"]["condition"] == "service_completed_successfully"
        for store in ("redis", "postgres", "minio"):
            assert depends[store]["condition"] == "service_healthy"
    assert command_of(SERVICES["migrate"])[:3] == ["captioner", "db", "upgrade"]
    bucket = SERVICES["createbuckets"]
    assert "mc mb" in " ".join(bucket["entrypoint"]) and bucket["restart"] == "no"


def test_deployment_has_the_parts_the_design_names():
    redis = command_of(SERVICES["redis"])
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert SERVICES["postgres"]["image"].startswith("postgres")
    assert SERVICES["minio"]["image"].startswith("minio/minio")

    assert command_of(SERVICES["dashboard"])[0] == "gunicorn"

    gpu = SERVICES["worker-gpu0"]
    argv = command_of(gpu)
    assert "--pool=threads" in argv and "--concurrency=2" in argv  # pipelined batches
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert len(device["device_ids"]) == 1  # one worker per GPU
    assert gpu["build"]["args"]["FLAVOR"] == "cuda"

    assert any(
        a.startswith("--queues=") and "train" in a for a in command_of(SERVICES["worker-train"])
    )
    assert command_of(SERVICES["beat"])[:2] == ["captioner", "beat"]
    flower = command_of(SERVICES["flower"])
    assert "flower" in flower and any(a.startswith("--basic-auth=") for a in flower)


def worker_pools() -> dict[str, tuple[frozenset[str], str, int]]:
    """{service: (queues, pool, concurrency)} of every `captioner worker` service, as
    `captioner worker` would choose them from its command."""
    from captioner.cli.worker import choose_pool, queue_set
    from captioner.cli.worker import worker as worker_command

    pools = {}
    for name in OURS:
        argv = command_of(SERVICES[name])
        if argv[:2] != ["captioner", "worker"]:
            continue
        params = worker_command.make_context("worker", argv[2:]).params
        queues = params["queues"]
        pool, concurrency = choose_pool(
            params["pool"], params["concurrency"], queues, Settings(device="cpu")
        )
        pools[name] = (queue_set(queues), pool, concurrency)
    return pools


def test_no_worker_serves_both_train_and_maintenance():
    pools = worker_pools()
    assert {"worker-gpu0", "worker-train", "worker-maintenance"} <= set(pools)
    for name, (queues, _pool, _concurrency) in pools.items():
        assert not {"train", "maintenance"} <= queues, name
    assert pools["worker-train"][0] == {"train"}
    # Every queue the application publishes to is served by some worker.
    from captioner.tasks import ALL_QUEUES

    assert set(ALL_QUEUES) <= set().union(*(q for q, _p, _c in pools.values()))


def test_maintenance_runs_only_on_pools_that_enforce_time_limits():
    from captioner.cli.worker import LIMITED_POOLS

    pools = worker_pools()
    serving = {name: pool for name, (queues, pool, _c) in pools.items() if "maintenance" in queues}
    assert serving == {"worker-maintenance": "prefork"}
    assert "prefork" in LIMITED_POOLS
    queues, _pool, concurrency = pools["worker-maintenance"]
    assert queues == {"maintenance"} and concurrency > 1  # one slow task holds one slot
    # The time limits the pool enforces are configured (globally, for every task).
    from workers.celery_app import create_celery_app

    conf = create_celery_app(Settings()).conf
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit


def test_volumes_are_named_and_declared():
    declared = set(COMPOSE["volumes"])
    used = set()
    for svc in SERVICES.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert not source.startswith(("/", ".")), f"bind mount {volume}: use a named volume"
            used.add(source)
    assert used == declared


def test_dockerfile_has_cpu_and_cuda_flavours_the_compose_file_uses():
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, re.MULTILINE))
    assert {"requirements", "wheel", "base-cpu", "base-cuda", "dashboard", "worker"} <= stages
    assert re.search(r"^FROM base-\$\{FLAVOR\} AS worker", DOCKERFILE, re.MULTILINE)
    for name in OURS:
        build = SERVICES[name]["build"]
        assert build["target"] in stages
        if "args" in build:
            assert f"base-{build['args']['FLAVOR']}" in stages
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored and ".git" in ignored
    assert not {"LICENSE", "README.md", "pyproject.toml", "migrations"} & set(ignored)


def test_dashboard_image_without_torch_and_worker_image_with_it_from_one_wheel():
    web_side = {"migrate", "dashboard", "beat", "flower"}
    for name in OURS:
        target = SERVICES[name]["build"]["target"]
        assert target == ("dashboard" if name in web_side else "worker"), name
    assert {name for name in OURS if name.startswith("worker")} == {
        "worker-gpu0",
        "worker-train",
        "worker-maintenance",
    }
    # Built once in the `wheel` stage; each image installs that wheel without its dependencies,
    # after its own list of them.
    assert len(re.findall(r"pip wheel --no-deps", DOCKERFILE)) == 1
    for target in ("dashboard", "worker"):
        stage = dockerfile_stage(target)
        assert "from=wheel" in stage and "pip install --no-deps /wheels/captioner-" in stage
        assert "pip install -r /tmp/requirements.txt" in stage


def dockerfile_stage(name: str) -> str:
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(name)}$", DOCKERFILE, re.MULTILINE)
    assert start, name
    rest = DOCKERFILE[start.end() :]
    end = re.search(r"^FROM\s", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def model_packages() -> set[str]:
    (found,) = re.findall(r'^ARG MODEL_PACKAGES="([^"]+)"', DOCKERFILE, re.MULTILINE)
    return set(found.split())


def test_dockerfile_requirement_lists(tmp_path):
    """The Dockerfile's own script, run on pyproject.toml: the dashboard's list is every
    dependency but the model stack, plus `deploy`; the worker's is every dependency."""
    import subprocess
    import sys
    import tomllib

    (script,) = re.findall(
        r"^RUN python - <<'EOF'\n(.*?)^EOF$", DOCKERFILE, re.MULTILINE | re.DOTALL
    )
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    env = {"MODEL_PACKAGES": " ".join(sorted(model_packages())), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-"], input=script, text=True, cwd=tmp_path, env=env, check=True
    )
    web = (tmp_path / "web.txt").read_text().split()
    worker = (tmp_path / "worker.txt").read_text().split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deploy = project["optional-dependencies"]["deploy"]

    def name(req: str) -> str:
        return re.split(r"[\[=<>!~;]", req, maxsplit=1)[0].lower()

    assert "torch" in model_packages() and "torch" in {name(r) for r in worker}
    assert not {name(r) for r in web} & model_packages()
    assert set(deploy) <= set(web) and set(project["dependencies"]) <= set(worker)
    assert {name(r) for r in project["dependencies"]} - model_packages() <= {name(r) for r in web}


def test_dashboard_image_commands_run_without_the_model_stack(tmp_path):
    """What the dashboard image runs (the app, migrations, the CLI, beat's and Flower's Celery app)
    with every package the dashboard image leaves out made unimportable."""
    import subprocess
    import sys

    code = f"""
import sys
BLOCKED = {sorted(model_packages())!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the dashboard image")

sys.meta_path.insert(0, Block())
from captioner.cli import cli
cli.main(["db", "upgrade"], standalone_mode=False)
admin = ["ops@example.com", "--role", "admin", "--password", "a long passphrase 1"]
cli.main(["user", "create", *admin], standalone_mode=False)
from dashboard import create_app
create_app()
from workers.entry import app
app.loader.import_default_modules()
print("ok")
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "CAPTIONER_DATA_DIR": str(tmp_path),
        "CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'web.db'}",
        "CAPTIONER_SECRET_KEY": "compose-requires-one",  # the built-in default is refused
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_readme_configuration_table_is_generated_from_settings():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_config_table", ROOT / "scripts" / "gen_config_table.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (ROOT / "README.md").read_text()
    assert gen.current(readme) == gen.block(), "run scripts/gen_config_table.py"
    for name in Settings.model_fields:  # every setting has a row and a description
        assert f"| `CAPTIONER_{name.upper()}` |" in readme
        assert Settings.model_fields[name].description, name


def test_dashboard_health_check_calls_health_on_loopback_and_secrets_are_required():
    check = " ".join(SERVICES["dashboard"]["healthcheck"]["test"])
    # /health details and /metrics are for loopback callers or the metrics token: the
    # container's own check is a loopback caller without a proxy header.
    assert "http://127.0.0.1:" in check and "/health" in check and "X-Forwarded-For" not in check
    env = COMPOSE["x-captioner-env"]
    assert env["CAPTIONER_SECRET_KEY"].startswith("${CAPTIONER_SECRET_KEY:?")
    assert substitute(env["CAPTIONER_METRICS_TOKEN"]) == ""
    assert Settings(metrics_token=substitute(env["CAPTIONER_METRICS_TOKEN"])).metrics_token is None


DEFAULT_SERVICES = {
    "redis",
    "postgres",
    "minio",
    "createbuckets",
    "migrate",
    "dashboard",
    "worker-gpu0",
    "worker-train",
    "worker-maintenance",
    "beat",
    "flower",
}
MONITORING = {"prometheus", "grafana"}


def test_monitoring_is_an_optional_profile_and_the_default_set_is_unchanged():
    """`docker compose config` / `up` without a profile starts what it did before; Prometheus
    and Grafana only with `--profile monitoring`, and nothing of the default set needs them."""
    by_profile: dict[tuple, set[str]] = {}
    for name, svc in SERVICES.items():
        by_profile.setdefault(tuple(svc.get("profiles", ())), set()).add(name)
    assert by_profile == {(): DEFAULT_SERVICES, ("monitoring",): MONITORING}
    for name in DEFAULT_SERVICES:
        assert not set(SERVICES[name].get("depends_on", {})) & MONITORING, name
        assert not SERVICES[name].get("configs") and not SERVICES[name].get("secrets"), name
    assert SERVICES["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in MONITORING:  # published on loopback only, like the MinIO console
        assert all(str(p).startswith("127.0.0.1:") for p in SERVICES[name]["ports"]), name


def mounted(service: str) -> dict[str, Path]:
    """Target path in the container -> the repository file compose mounts there."""
    return {
        c["target"]: ROOT / COMPOSE["configs"][c["source"]]["file"]
        for c in SERVICES[service]["configs"]
    }


def test_prometheus_scrapes_the_dashboard_metrics_with_the_metrics_token():
    files = mounted("prometheus")
    config = yaml.safe_load(files["/etc/prometheus/prometheus.yml"].read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "captioner-dashboard"]
    assert job["metrics_path"] == "/metrics"
    port = command_of(SERVICES["dashboard"])[1].rsplit(":", 1)[1]  # --bind=0.0.0.0:8000
    assert job["static_configs"][0]["targets"] == [f"dashboard:{port}"]
    # The bearer token is the file compose makes from the CAPTIONER_METRICS_TOKEN setting.
    (secret,) = SERVICES["prometheus"]["secrets"]
    assert COMPOSE["secrets"][secret] == {"environment": "CAPTIONER_METRICS_TOKEN"}
    assert "CAPTIONER_METRICS_TOKEN" in SETTINGS_ENV
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": f"/run/secrets/{secret}",
    }
    workers = {t for j in config["scrape_configs"] for t in j["static_configs"][0]["targets"]}
    for name, flag in (("worker-gpu0", "gpu0"), ("worker-train", "train")):
        port = next(a for a in command_of(SERVICES[name]) if a.startswith("--metrics-port="))
        assert f"{name}:{port.split('=')[1]}" in workers, flag


def test_grafana_is_provisioned_with_the_prometheus_source_and_the_dashboard():
    import json

    files = mounted("grafana")
    assert all(path.is_file() for path in files.values()), files
    sources = yaml.safe_load(
        files["/etc/grafana/provisioning/datasources/prometheus.yml"].read_text()
    )
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        files["/etc/grafana/provisioning/dashboards/captioner.yml"].read_text()
    )
    (provider,) = providers["providers"]
    dashboards = [t for t in files if t.startswith(provider["options"]["path"] + "/")]
    assert [files[t].relative_to(ROOT).as_posix() for t in dashboards] == [
        "deploy/grafana/captioner.json"
    ]
    dashboard = json.loads(files[dashboards[0]].read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def test_gunicorn_services_share_request_metrics_on_a_fresh_tmpfs():
    # Under several gunicorn processes /metrics must sum every process's counts (multiprocess
    # mode), from files that a restart empties.
    for name, service in SERVICES.items():
        if (service.get("command") or [None])[0] != "gunicorn":
            continue
        directory = service["environment"].get("PROMETHEUS_MULTIPROC_DIR")
        assert directory, f"{name}: PROMETHEUS_MULTIPROC_DIR unset"
        assert directory in service.get("tmpfs", []), f"{name}: {directory} is not a tmpfs"
        assert "CAPTIONER_DATABASE_URL" in service["environment"]  # the shared env still merged

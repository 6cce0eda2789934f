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
    for name in ("dashboard", "worker-gpu0", "worker-train", "beat"):
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
    assert {"base-cpu", "base-cuda", "app"} <= stages
    assert re.search(r"^FROM base-\$\{FLAVOR\} AS app", DOCKERFILE, re.MULTILINE)
    for name in OURS:
        build = SERVICES[name]["build"]
        assert build["target"] in stages
        assert f"base-{build['args']['FLAVOR']}" in stages
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored and ".git" in ignored


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

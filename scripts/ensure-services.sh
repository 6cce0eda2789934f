#!/usr/bin/env bash
# Start the local services the tests talk to, when they are not already up. Idempotent.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port, name
    for _ in $(seq 1 60); do up "$1" && return 0; sleep 0.5; done
    echo "ensure-services: $2 did not come up on 127.0.0.1:$1" >&2
    return 1
}

if ! up 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_for 5432 PostgreSQL
fi
if ! up 6379; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for 6379 Redis
fi
if ! up 5672; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
fi
# Chromium for the browser tests (Playwright drives Debian's package, never its own download).
if ! command -v chromium >/dev/null; then
    echo "installing Chromium"
    command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
        || echo "ensure-services: could not install chromium (the browser tests need it)" >&2
fi
exit 0

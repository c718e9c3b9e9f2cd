#!/usr/bin/env bash
# Query latency and memory: capstan beside Prometheus 2.42 on the same samples
# (10,000 series, one hour at 15 s, remote-written to both).
# Usage: bench/query.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }
work=$(mktemp -d)
pids=()
cleanup() {
  [ -x target/release/capstan ] && [ -f "$work/stack/capstan.yaml" ] && target/release/capstan down -f "$work/stack/capstan.yaml" >/dev/null 2>&1 || true
  kill "${pids[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release -q -p capstan -p capstan-query-bench

pp=$(free_port)
printf 'global: {scrape_interval: 1m}\nscrape_configs: []\n' > "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prom" \
  --web.listen-address=127.0.0.1:$pp --web.enable-remote-write-receiver >"$work/prom.log" 2>&1 & pids+=($!)

# capstan with a stack of one idle service; it scrapes itself and the host once a minute.
mkdir -p "$work/stack"
printf 'x-capstan: {scrape_interval: 60s}\nservices:\n  idle:\n    command: ["sleep", "3600"]\n    x-capstan: {metrics: {disable: true}}\n' > "$work/stack/capstan.yaml"
cp_=$(free_port)
target/release/capstan up -d -f "$work/stack/capstan.yaml" --listen 127.0.0.1:$cp_ >/dev/null

for _ in $(seq 100); do curl -sf localhost:$pp/-/ready >/dev/null && break; sleep 0.1; done
echo "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}'), capstan $(git rev-parse --short HEAD)"
target/release/capstan-query-bench 127.0.0.1:$cp_ "$work/stack/.capstan/token" 127.0.0.1:$pp "${1:-15}"

#!/usr/bin/env bash
# Latency added in front of a container: capstan's proxy against the engine's
# published port (docker-proxy), both measured against the container's own
# address on its bridge (no hop). The same demo image (FROM scratch: the release
# binary and its libraries), one container each, open-loop `capstan load`.
# Usage: bench/containers-proxy.sh [RATE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
secs=${2:-10}
cargo build --release --workspace -q
root=$PWD
bin=$root/target/release/capstan
work=$(mktemp -d)
cleanup() {
  docker rm -f capstan-bench-direct >/dev/null 2>&1 || true
  (cd "$work/stack" 2>/dev/null && "$bin" down >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT

. bench/demo-image.sh
demo_image "$work" 'ENV LOG_REQUESTS=0'

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
load() { "$bin" load "$1" --rate "$rate" -d "${secs}s" -o json; }
pct() { python3 -c "import json,sys; v=json.load(sys.stdin); l=v['latency_ms']; print(f\"{l['p50']:.3f} {l['p99']:.3f} {v['errors']} {v['requests']}\")"; }

# The engine's published port (docker-proxy on loopback).
dp=$(free_port)
docker run -d --name capstan-bench-direct -p "127.0.0.1:$dp:8080" capstan-demo:bench >/dev/null
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' capstan-bench-direct)
until curl -s "http://$ip:8080/healthz" >/dev/null; do sleep 0.1; done

# capstan's proxy in front of the same image.
cp_port=$(free_port)
mkdir -p "$work/stack"
cat > "$work/stack/capstan.yaml" <<YAML
services:
  web:
    image: capstan-demo:bench
    ports: ["127.0.0.1:$cp_port:8080"]
    x-capstan:
      healthcheck: {http: /healthz, interval: 1s}
      metrics: {disable: true}
      proxy: {access_log: false}
YAML
(cd "$work/stack" && "$bin" up -d --listen 127.0.0.1:0 >/dev/null)

# A short warm-up of every path first (connections, caches, CPU frequency).
for u in "http://$ip:8080/" "http://127.0.0.1:$dp/" "http://127.0.0.1:$cp_port/"; do
  "$bin" load "$u" --rate "$rate" -d 2s -o json >/dev/null
done
read -r d50 d99 derr dn < <(load "http://$ip:8080/" | pct)
read -r p50 p99 perr pn < <(load "http://127.0.0.1:$dp/" | pct)
read -r c50 c99 cerr cn < <(load "http://127.0.0.1:$cp_port/" | pct)
echo "rate $rate/s for ${secs}s, one container each"
printf '%-36s %9s %9s %7s %9s\n' path p50_ms p99_ms errors requests
printf '%-36s %9s %9s %7s %9s\n' "container address (no hop)" "$d50" "$d99" "$derr" "$dn"
printf '%-36s %9s %9s %7s %9s\n' "engine published port (docker-proxy)" "$p50" "$p99" "$perr" "$pn"
printf '%-36s %9s %9s %7s %9s\n' "capstan proxy" "$c50" "$c99" "$cerr" "$cn"
python3 -c "print(f'added p99: docker-proxy {($p99-$d99):.3f} ms, capstan {($c99-$d99):.3f} ms')"

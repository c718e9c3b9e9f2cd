#!/usr/bin/env bash
# Latency added in front of a container: capstan's proxy against the engine's
# published port (docker-proxy), both measured against the container's own
# address on its bridge (no hop). The same demo image (FROM scratch: the release
# binary and its libraries), one container each, open-loop `capstan load`.
# The three paths are measured in ROUNDS rounds, interleaved (the order rotates
# each round), and the medians of the rounds' figures are reported: on a 2-core
# machine one run of each is dominated by scheduling noise.
# Usage: bench/containers-proxy.sh [RATE] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
secs=${2:-5}
rounds=${3:-7}
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
tcp_port=$(free_port)
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
  raw:
    image: capstan-demo:bench
    ports: ["127.0.0.1:$tcp_port:8080"]
    x-capstan:
      protocol: tcp
      healthcheck: {http: /healthz, interval: 1s}
      metrics: {disable: true}
YAML
(cd "$work/stack" && "$bin" up -d --listen 127.0.0.1:0 >/dev/null)

# A short warm-up of every path first (connections, caches, CPU frequency).
for u in "http://$ip:8080/" "http://127.0.0.1:$dp/" "http://127.0.0.1:$cp_port/" "http://127.0.0.1:$tcp_port/"; do
  "$bin" load "$u" --rate "$rate" -d 2s -o json >/dev/null
done
paths=("http://$ip:8080/" "http://127.0.0.1:$dp/" "http://127.0.0.1:$cp_port/" "http://127.0.0.1:$tcp_port/")
names=("container address (no hop)" "engine published port (docker-proxy)" "capstan proxy (HTTP)" "capstan proxy (TCP)")
results=$work/results
: > "$results"
for ((r = 0; r < rounds; r++)); do
  for ((k = 0; k < 4; k++)); do
    j=$(((k + r) % 4))
    read -r p50 p99 err n < <(load "${paths[$j]}" | pct)
    echo "$r $j $p50 $p99 $err $n" >> "$results"
  done
done
echo "rate $rate/s, ${secs}s per path per round, $rounds rounds interleaved, one container each"
python3 - "$results" "${names[@]}" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
by = {j: [r for r in rows if int(r[1]) == j] for j in range(len(names))}
med = lambda j, c: st.median(float(r[c]) for r in by[j])
print(f"{'path':<38}{'p50_ms':>9}{'p99_ms':>9}{'errors':>8}{'requests':>10}   (medians of the rounds)")
for j in range(len(names)):
    errs = sum(int(r[4]) for r in by[j]); reqs = sum(int(r[5]) for r in by[j])
    print(f"{names[j]:<38}{med(j,2):>9.3f}{med(j,3):>9.3f}{errs:>8}{reqs:>10}")
# Added p99 per round (each path against the direct address of the same round).
def added(j):
    return st.median(float(by[j][r][3]) - float(by[0][r][3]) for r in range(len(by[0])))
dp, cp, ct = added(1), added(2), added(3)
print(f"added p99 (median over rounds): docker-proxy {dp:+.3f} ms, capstan HTTP {cp:+.3f} ms, capstan TCP {ct:+.3f} ms")
PY

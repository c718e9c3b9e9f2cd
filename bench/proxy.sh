#!/usr/bin/env bash
# The proxy beside nginx (Debian's nginx-light as a keep-alive reverse proxy to
# the same two demo replicas) and direct access to one replica: throughput with
# wrk, and latency at a moderate constant rate with `capstan load --rate`.
# Usage: [ROUNDS=3] [ACCESS_LOG=false] [TRACES=false] bench/proxy.sh [SECONDS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rate=${2:-2000}
# ACCESS_LOG=false turns off capstan's access log (nginx keeps its own).
# TRACES=false turns off the proxy's request spans.
missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
if ((${#missing[@]})); then
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
fi
work=$(mktemp -d)
pids=()
cleanup() {
  [ -f "$work/stack/capstan.yaml" ] && target/release/capstan down -f "$work/stack/capstan.yaml" >/dev/null 2>&1 || true
  kill "${pids[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release -q -p capstan -p capstan-demo
demo=$PWD/target/release/capstan-demo
cport=$(free_port)
mkdir -p "$work/stack"
cat > "$work/stack/capstan.yaml" <<EOF
x-capstan: {scrape_interval: 15s}
services:
  web:
    command: ["$demo"]
    environment: {LOG_REQUESTS: "0"}
    ports: ["127.0.0.1:$cport:http"]
    x-capstan:
      healthcheck: {http: /healthz, interval: 1s}
      metrics: {disable: true}
      proxy: {access_log: ${ACCESS_LOG:-true}, traces: ${TRACES:-true}}
    deploy: {replicas: 2}
EOF
target/release/capstan up -d -f "$work/stack/capstan.yaml" --listen 127.0.0.1:0 >/dev/null
ports=$(target/release/capstan ps -f "$work/stack/capstan.yaml" -o json | python3 -c 'import json,sys; print(" ".join(str(r["port"]) for r in json.load(sys.stdin) if r["service"]=="web"))')
set -- $ports
p0=$1
p1=$2

nport=$(free_port)
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes auto;
error_log $work/nginx/logs/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log $work/nginx/logs/access.log;
  upstream app { server 127.0.0.1:$p0; server 127.0.0.1:$p1; keepalive 128; }
  server {
    listen 127.0.0.1:$nport;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
/usr/sbin/nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' & pids+=($!)
for _ in $(seq 100); do curl -sf "127.0.0.1:$nport/" >/dev/null && curl -sf "127.0.0.1:$cport/" >/dev/null && break; sleep 0.1; done

nginx_version=$(/usr/sbin/nginx -v 2>&1 | sed 's/.*nginx\///')
echo "capstan $(git rev-parse --short HEAD), nginx $nginx_version, wrk, $(nproc) CPUs; replicas on ports $p0 $p1"
declare -A rps p50 p99 runs cpu reqs
# CPU time (ticks) of the proxy's processes: capstan's daemon, nginx's master and workers.
daemon_pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$work/stack/.capstan/daemon.json")
pids_of() {
  case $1 in
    capstan) echo "$daemon_pid" ;;
    nginx) m=$(cat "$work/nginx/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')" ;;
    *) echo "" ;;
  esac
}
ticks() { local t=0 p; for p in $(pids_of "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
# Throughput: ROUNDS (default 3) alternating rounds, the median of each.
rounds=${ROUNDS:-3}
for target in direct:$p0 nginx:$nport capstan:$cport; do
  wrk -t2 -c50 -d2s "http://127.0.0.1:${target#*:}/" >/dev/null  # warm-up
done
for round in $(seq "$rounds"); do
  for target in direct:$p0 nginx:$nport capstan:$cport; do
    name=${target%%:*}; port=${target#*:}
    t0=$(ticks "$name")
    out=$(wrk -t2 -c50 -d"${secs}s" --latency "http://127.0.0.1:$port/")
    t1=$(ticks "$name")
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    cpu[$name]=$(( ${cpu[$name]:-0} + t1 - t0 ))
    reqs[$name]=$(python3 -c "print(${reqs[$name]:-0} + int($r * $secs))")
    runs[$name]="${runs[$name]:-} $r"
    printf 'round %s %-8s wrk -t2 -c50 %ss: %10s req/s  (%s)\n' "$round" "$name" "$secs" "$r" "$(awk '/ 99%/ {print "p99 " $2}' <<<"$out")"
  done
done
for name in direct nginx capstan; do
  rps[$name]=$(tr ' ' '\n' <<<"${runs[$name]}" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '%-8s median of %s: %s req/s\n' "$name" "$rounds" "${rps[$name]}"
done
tck=$(getconf CLK_TCK)
for name in nginx capstan; do
  printf '%-8s CPU per request under wrk: %s us\n' "$name" "$(python3 -c "print(round(${cpu[$name]} / $tck / ${reqs[$name]} * 1e6, 1))")"
done
for target in direct:$p0 nginx:$nport capstan:$cport; do
  name=${target%%:*}; port=${target#*:}
  json=$(target/release/capstan load "http://127.0.0.1:$port/" --rate "$rate" -d "${secs}s" -o json)
  p50[$name]=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_ms"]["p50"])' <<<"$json")
  p99[$name]=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_ms"]["p99"])' <<<"$json")
  printf '%-8s capstan load --rate %s %ss: p50 %s ms, p99 %s ms\n' "$name" "$rate" "$secs" "${p50[$name]}" "${p99[$name]}"
done
python3 - "${rps[nginx]}" "${rps[capstan]}" "${rps[direct]}" "${p99[direct]}" "${p99[nginx]}" "${p99[capstan]}" "${p50[direct]}" "${p50[capstan]}" <<'EOF'
import sys
ng, cp, di, d99, n99, c99, d50, c50 = map(float, sys.argv[1:])
print(f"throughput: capstan/nginx = {cp/ng:.2f}x (target >= 1.10), capstan/direct = {cp/di:.2f}x")
print(f"added p99 over direct: capstan {c99-d99:+.3f} ms (target <= 0.100), nginx {n99-d99:+.3f} ms; added p50: capstan {c50-d50:+.3f} ms")
EOF

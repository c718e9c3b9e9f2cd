#!/usr/bin/env bash
# Side by side: `capstan up -d` / `down` against `docker-compose up -d` / `down` for
# the demo service with N replicas. The demo image is built locally (no registry):
# the release binary and the libraries it links, imported as a FROM-scratch image.
# capstan's `up -d` returns once replicas are *healthy* (HTTP check); docker-compose
# returns once containers are *started* (no health check).
# Usage: bench/vs-compose.sh [N] [TRIALS] [process|container]
# With `container`, capstan runs the same image through the engine as
# docker-compose does; with `process` (default), the same binary as a process.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
trials=${2:-5}
driver=${3:-process}
command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
cargo build --release --workspace -q
root=$PWD
work=$(mktemp -d)
trap 'cd "$work/compose" 2>/dev/null && docker-compose down -t 10 >/dev/null 2>&1; cd /; "$root/target/release/capstan" --data-dir "$work/capstan/.capstan" down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# Image: the demo binary and its shared libraries.
. bench/demo-image.sh
demo_image "$work"

mkdir -p "$work/compose" "$work/capstan"
cat > "$work/compose/docker-compose.yml" <<YAML
version: "2.4"
services:
  web:
    image: capstan-demo:bench
    environment: {PORT: "8080"}
    scale: $n
YAML
if [ "$driver" = container ]; then
  run='image: capstan-demo:bench'
else
  run="command: [\"$root/target/release/capstan-demo\"]"
fi
cat > "$work/capstan/capstan.yaml" <<YAML
services:
  web:
    $run
    x-capstan:
      healthcheck: {http: /healthz, interval: 1s}
    deploy: {replicas: $n}
YAML
ms() { date +%s%3N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
cu=(); cd_=(); du=(); dd=(); rss=()
for t in $(seq "$trials"); do
  cd "$work/capstan"
  t0=$(ms); "$root/target/release/capstan" up -d --listen 127.0.0.1:0 >/dev/null; t1=$(ms)
  pid=$(python3 -c 'import json;print(json.load(open(".capstan/daemon.json"))["pid"])')
  rss+=($(awk '/VmRSS/{print $2}' /proc/$pid/status))
  "$root/target/release/capstan" down >/dev/null; t2=$(ms)
  cu+=($((t1-t0))); cd_+=($((t2-t1)))
  cd "$work/compose"
  t0=$(ms); docker-compose up -d >/dev/null 2>&1; t1=$(ms)
  docker-compose down -t 10 >/dev/null 2>&1; t2=$(ms)
  du+=($((t1-t0))); dd+=($((t2-t1)))
  echo "trial $t: capstan up ${cu[-1]} ms down ${cd_[-1]} ms | docker-compose up ${du[-1]} ms down ${dd[-1]} ms"
done
mc=$(median "${cu[@]}"); mcd=$(median "${cd_[@]}"); md=$(median "${du[@]}"); mdd=$(median "${dd[@]}")
echo "median ($n replicas, capstan's $driver driver): capstan up $mc ms (to healthy), down $mcd ms, daemon RSS $(median "${rss[@]}") KiB; docker-compose up $md ms (to started), down $mdd ms"
echo "ratio docker-compose/capstan: up $(awk "BEGIN{printf \"%.1f\", $md/$mc}")x, down $(awk "BEGIN{printf \"%.1f\", $mdd/$mcd}")x"

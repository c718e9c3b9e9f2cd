#!/usr/bin/env bash
# Cold start of a container from zero: a stack with `autoscale: {min: 0}` is
# left to scale to zero, then one GET through capstan's proxy is timed from
# when it is sent to its answer. Beside it, the engine alone: `docker run` of
# the same image until its first answer. Usage: bench/container-coldstart.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-5}
cargo build --release --workspace -q
root=$PWD
bin=$root/target/release/capstan
work=$(mktemp -d)
cleanup() {
  docker rm -f capstan-bench-cold >/dev/null 2>&1 || true
  (cd "$work/stack" 2>/dev/null && "$bin" down >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT
. bench/demo-image.sh
demo_image "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/stack"
cat > "$work/stack/capstan.yaml" <<YAML
services:
  web:
    image: capstan-demo:bench
    ports: ["127.0.0.1:$port:8080"]
    x-capstan:
      healthcheck: {http: /healthz, interval: 1s}
      metrics: {disable: true}
      autoscale: {min: 0, max: 1, idle_after: 2s, interval: 500ms}
YAML
cd "$work/stack"
"$bin" up -d --listen 127.0.0.1:0 >/dev/null
ms() { date +%s%3N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
cold=(); engine=()
for t in $(seq "$trials"); do
  until [ "$("$bin" ps -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 0 ]; do sleep 0.2; done
  t0=$(ms); curl -sf "http://127.0.0.1:$port/" >/dev/null; t1=$(ms)
  cold+=($((t1-t0)))
  # The engine alone: run the image until it answers on its address.
  t0=$(ms)
  docker run -d --name capstan-bench-cold capstan-demo:bench >/dev/null
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' capstan-bench-cold)
  until curl -sf "http://$ip:8080/" >/dev/null; do sleep 0.005; done
  t1=$(ms)
  engine+=($((t1-t0)))
  docker rm -f capstan-bench-cold >/dev/null
  echo "trial $t: through capstan from zero ${cold[-1]} ms; docker run to first answer ${engine[-1]} ms"
done
echo "median of $trials: capstan cold start $(median "${cold[@]}") ms; docker run to first answer $(median "${engine[@]}") ms"

#!/usr/bin/env bash
# Starts and stops throwaway Redis servers for esq's tests: loopback only, no persistence.
#
#   scripts/redis.sh install                          apt-get install redis-server if missing
#   scripts/redis.sh start DIR PORT                   one standalone server
#   scripts/redis.sh start-cluster DIR P1 P2 P3       a Redis Cluster of three masters
#   scripts/redis.sh stop DIR                         stop every server started under DIR
#
# `start` and `start-cluster` print the matching environment line for the tests on stdout, so
#   eval "$(scripts/redis.sh start /tmp/esq-redis 6390)"
# sets ESQ_TEST_REDIS (or ESQ_TEST_REDIS_CLUSTER). Everything else goes to stderr or to logs
# under DIR/<port>/.
set -euo pipefail

HOST=127.0.0.1
WAIT_SECONDS=30

die() {
  echo "redis.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_redis() {
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found; run: $0 install"
  command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found; run: $0 install"
}

check_port() {
  [[ "$1" =~ ^[0-9]+$ ]] && (("$1" > 0 && "$1" < 65536)) || die "not a port: $1"
  if (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; then
    die "something already listens on $HOST:$1"
  fi
}

# The absolute path of DIR, created if needed.
abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd)
}

cli() {
  local port=$1
  shift
  redis-cli -h "$HOST" -p "$port" "$@"
}

# Starts one daemonized server in DIR/PORT with any extra redis-server options.
start_server() {
  local dir=$1 port=$2
  shift 2
  local node="$dir/$port"
  mkdir -p "$node"
  redis-server --bind "$HOST" --port "$port" --protected-mode yes \
    --save '' --appendonly no --daemonize yes \
    --dir "$node" --pidfile "$node/redis.pid" --logfile "$node/redis.log" "$@" \
    || die "redis-server on port $port did not start (see $node/redis.log)"
}

wait_ping() {
  local dir=$1 port=$2
  for _ in $(seq 1 $((WAIT_SECONDS * 10))); do
    if [[ "$(cli "$port" ping 2>/dev/null || true)" == PONG ]]; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$dir/$port/redis.log" >&2 || true
  die "redis on port $port did not answer within ${WAIT_SECONDS}s"
}

cmd_install() {
  if command -v redis-server >/dev/null 2>&1; then
    echo "redis.sh: $(redis-server --version)" >&2
    return 0
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y redis-server
  redis-server --version >&2
}

cmd_start() {
  (($# == 2)) || usage
  need_redis
  local dir port=$2
  check_port "$port"
  dir=$(abs_dir "$1")
  start_server "$dir" "$port"
  wait_ping "$dir" "$port"
  echo "export ESQ_TEST_REDIS=redis://$HOST:$port"
}

cmd_start_cluster() {
  (($# == 4)) || usage
  need_redis
  local dir ports=("$2" "$3" "$4") port nodes=() urls=()
  for port in "${ports[@]}"; do
    check_port "$port"
  done
  dir=$(abs_dir "$1")
  for port in "${ports[@]}"; do
    # A fresh cluster every time: forget the topology of an earlier run in this DIR.
    rm -f "$dir/$port/nodes.conf"
    start_server "$dir" "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000
  done
  for port in "${ports[@]}"; do
    wait_ping "$dir" "$port"
    nodes+=("$HOST:$port")
    urls+=("redis://$HOST:$port")
  done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$dir/cluster-create.log" 2>&1; then
    cat "$dir/cluster-create.log" >&2
    die "redis-cli --cluster create failed"
  fi
  for port in "${ports[@]}"; do
    local ok=
    for _ in $(seq 1 $((WAIT_SECONDS * 10))); do
      if cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
        ok=1
        break
      fi
      sleep 0.1
    done
    [[ -n "$ok" ]] || die "cluster node $port not ok within ${WAIT_SECONDS}s"
  done
  local IFS=,
  echo "export ESQ_TEST_REDIS_CLUSTER=${urls[*]}"
}

cmd_stop() {
  (($# == 1)) || usage
  [[ -d "$1" ]] || return 0
  local dir pidfile pid
  dir=$(abs_dir "$1")
  while IFS= read -r -d '' pidfile; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    # Only a redis-server we started: the pid file may be stale and the pid reused.
    if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(ps -p "$pid" -o comm= 2>/dev/null || true)" == redis-server* ]]; then
      kill "$pid"
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        echo "redis.sh: pid $pid ignored SIGTERM; killing it" >&2
        kill -9 "$pid" 2>/dev/null || true
      fi
      echo "redis.sh: stopped redis pid $pid ($(dirname "$pidfile"))" >&2
    fi
    rm -f "$pidfile"
  done < <(find "$dir" -name redis.pid -print0)
}

(($# >= 1)) || usage
command=$1
shift
case "$command" in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  start-cluster) cmd_start_cluster "$@" ;;
  stop) cmd_stop "$@" ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Starts and stops throwaway Redis servers for esq's tests: loopback only, no persistence
# (except the HA cluster's append-only files, so a killed node can come back).
#
#   scripts/redis.sh install                          apt-get install redis-server if missing
#   scripts/redis.sh start DIR PORT                   one standalone server
#   scripts/redis.sh start-cluster DIR P1 P2 P3       a Redis Cluster of three masters
#   scripts/redis.sh certs CERTS                      a throwaway CA, server and client certificates
#   scripts/redis.sh start-secure DIR CERTS PORT      a standalone server: TLS only, ACL user `esq`
#   scripts/redis.sh start-cluster-secure DIR CERTS P1 P2 P3   the same as a Cluster of three
#   scripts/redis.sh start-cluster-ha DIR P1 P2 P3 P4 P5 P6   3 masters + 3 replicas, AOF on
#   scripts/redis.sh kill DIR PORT                    SIGKILL the server on PORT (reaped)
#   scripts/redis.sh restart DIR PORT                 relaunch it with its nodes.conf and data
#   scripts/redis.sh stop DIR                         stop every server started under DIR
#
# Cluster buses listen on each port + $ESQ_REDIS_BUS_OFFSET (default 10000, as Redis does).
# `start` and `start-cluster` print the matching environment line for the tests on stdout, so
#   eval "$(scripts/redis.sh start /tmp/esq-redis 6390)"
# sets ESQ_TEST_REDIS (or ESQ_TEST_REDIS_CLUSTER). Everything else goes to stderr or to logs
# under DIR/<port>/.
#
# The HA cluster (`start-cluster-ha`) is for failover tests: cluster-node-timeout 2000 ms so a
# replica takes over a killed master within seconds (replica-validity-factor 0: whatever its
# replication lag; `start-cluster-ha` returns once every replica is synced), append-only file on (a restarted node
# comes back with its data and nodes.conf and rejoins, as a replica of whoever took over).
# It prints ESQ_TEST_REDIS_CLUSTER_HA (all six URLs) and ESQ_TEST_REDIS_CLUSTER_HA_DIR.
# `kill` sends SIGKILL (no shutdown, no AOF fsync beyond what the server already did);
# `restart` relaunches the node of DIR/PORT with the options it was started with.
#
# The secure servers listen with TLS only (`--port 0 --tls-port PORT`, cluster bus and
# replication over TLS too) and require client certificates signed by CERTS/ca.pem; the
# `default` user is off and user `esq` has a password made at run time (CERTS/redis-password).
# Their own outgoing connections (cluster bus, replication) present CERTS/client.pem.
# They print ESQ_TEST_REDIS_SECURE / ESQ_TEST_REDIS_CLUSTER_SECURE (rediss:// URLs with the
# credentials) and ESQ_TEST_REDIS_TLS_DIR (CERTS: ca.pem, client.pem, client-key.pem). `certs`
# writes a throwaway loopback PKI with `esq tls generate` ($ESQ_BIN, default `esq` on PATH)
# unless CERTS already holds one; nothing of it is kept in the repository.
set -euo pipefail

HOST=127.0.0.1
WAIT_SECONDS=30
# A Cluster node's bus listens on its port plus this (Redis' own default is 10000).
BUS_OFFSET=${ESQ_REDIS_BUS_OFFSET:-10000}

die() {
  echo "redis.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2
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

# Extra redis-cli options (TLS and credentials) for the secure servers; empty for plain ones.
CLI_OPTS=()

cli() {
  local port=$1
  shift
  redis-cli -h "$HOST" -p "$port" "${CLI_OPTS[@]}" "$@"
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
  local dir ports=("$2" "$3" "$4") port
  for port in "${ports[@]}"; do
    check_port "$port"
  done
  dir=$(abs_dir "$1")
  for port in "${ports[@]}"; do
    # A fresh cluster every time: forget the topology of an earlier run in this DIR.
    rm -f "$dir/$port/nodes.conf"
    start_server "$dir" "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000 --cluster-port $((port + BUS_OFFSET))
  done
  create_cluster "$dir" "redis://" "ESQ_TEST_REDIS_CLUSTER" "${ports[@]}"
}

# Joins the started servers on PORTS into a Cluster and prints `export VAR=<url prefix>host:port,…`.
create_cluster() {
  local dir=$1 prefix=$2 var=$3
  shift 3
  local ports=("$@") port nodes=() urls=()
  for port in "${ports[@]}"; do
    wait_ping "$dir" "$port"
    nodes+=("$HOST:$port")
    urls+=("$prefix$HOST:$port")
  done
  if ! redis-cli "${CLI_OPTS[@]}" --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
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
  echo "export $var=${urls[*]}"
}

# Options of one HA cluster node (also what `restart` relaunches it with).
ha_opts() {
  local port=$1
  HA_OPTS=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
    --cluster-port $((port + BUS_OFFSET)) --appendonly yes --appendfsync everysec
    --cluster-replica-validity-factor 0)
}

cmd_start_cluster_ha() {
  (($# == 7)) || usage
  need_redis
  local dir ports=("$2" "$3" "$4" "$5" "$6" "$7") port
  for port in "${ports[@]}"; do
    check_port "$port"
  done
  dir=$(abs_dir "$1")
  for port in "${ports[@]}"; do
    # A fresh cluster every time: forget the topology and data of an earlier run in this DIR.
    rm -rf "${dir:?}/$port"
    ha_opts "$port"
    start_server "$dir" "$port" "${HA_OPTS[@]}"
  done
  local nodes=() urls=()
  for port in "${ports[@]}"; do
    wait_ping "$dir" "$port"
    nodes+=("$HOST:$port")
    urls+=("redis://$HOST:$port")
  done
  # redis-cli makes the first three masters and gives each a replica among the last three.
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >"$dir/cluster-create.log" 2>&1; then
    cat "$dir/cluster-create.log" >&2
    die "redis-cli --cluster create failed"
  fi
  wait_ha_ok "$dir" "${ports[@]}"
  local IFS=,
  echo "export ESQ_TEST_REDIS_CLUSTER_HA=${urls[*]}"
  echo "export ESQ_TEST_REDIS_CLUSTER_HA_DIR=$dir"
}

# Waits until every node on PORTS says cluster_state:ok and sees 3 replicas, and every replica's
# link to its master is up (synced: only then can it take over with the master's data).
wait_ha_ok() {
  local dir=$1 port
  shift
  for port in "$@"; do
    local ok=
    for _ in $(seq 1 $((WAIT_SECONDS * 10))); do
      if cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' &&
        [[ "$(cli "$port" cluster nodes 2>/dev/null | awk '$3 ~ /slave/ && $3 !~ /fail/ && $8 == "connected"' | wc -l)" == 3 ]] &&
        { cli "$port" info replication 2>/dev/null | grep -q '^role:master' ||
          cli "$port" info replication 2>/dev/null | grep -q '^master_link_status:up'; }; then
        ok=1
        break
      fi
      sleep 0.1
    done
    [[ -n "$ok" ]] || die "cluster node $port not ok with 3 replicas within ${WAIT_SECONDS}s"
  done
}

# The pid of the redis-server we started on DIR/PORT, or nothing.
node_pid() {
  local pidfile=$1/redis.pid pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(ps -p "$pid" -o comm= 2>/dev/null || true)" == redis-server* ]]; then
    echo "$pid"
  fi
}

cmd_kill() {
  (($# == 2)) || usage
  local dir port=$2 node pid
  dir=$(abs_dir "$1")
  node="$dir/$port"
  [[ -d "$node" ]] || die "no node under $node"
  pid=$(node_pid "$node")
  [[ -n "$pid" ]] || die "no redis-server of ours runs on port $port ($node/redis.pid)"
  kill -9 "$pid"
  # Reaped by init (it daemonized); wait until the pid is gone and nobody listens any more.
  for _ in $(seq 1 $((WAIT_SECONDS * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && die "redis pid $pid survived SIGKILL"
  rm -f "$node/redis.pid"
  echo "redis.sh: killed redis pid $pid (port $port) with SIGKILL" >&2
}

cmd_restart() {
  (($# == 2)) || usage
  need_redis
  local dir port=$2 node
  dir=$(abs_dir "$1")
  node="$dir/$port"
  [[ -f "$node/nodes.conf" ]] || die "no cluster node to restart under $node (no nodes.conf)"
  [[ -z "$(node_pid "$node")" ]] || die "redis on port $port still runs; kill it first"
  check_port "$port"
  ha_opts "$port"
  start_server "$dir" "$port" "${HA_OPTS[@]}"
  wait_ping "$dir" "$port"
  echo "redis.sh: restarted redis on port $port" >&2
}

cmd_certs() {
  (($# == 1)) || usage
  local dir esq=${ESQ_BIN:-esq}
  dir=$(abs_dir "$1")
  if [[ -s "$dir/ca.pem" && -s "$dir/server.pem" && -s "$dir/client.pem" ]]; then
    return 0
  fi
  command -v "$esq" >/dev/null 2>&1 ||
    die "no esq binary to make certificates with: cargo build --workspace --bins, then ESQ_BIN=target/debug/esq"
  "$esq" tls generate --dir "$dir" >&2 || die "esq tls generate failed"
}

# The password of user `esq` for the secure servers of CERTS (made once, kept in CERTS).
secure_password() {
  local certs=$1
  if [[ ! -s "$certs/redis-password" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(16))' >"$certs/redis-password")
  fi
  cat "$certs/redis-password"
}

# Options of a secure server: TLS only, client certificates required, ACL from a file.
secure_server_opts() {
  local certs=$1 node=$2 port=$3 password=$4
  mkdir -p "$node"
  (umask 077 && printf 'user default off\nuser esq on >%s ~* &* +@all\n' "$password" >"$node/users.acl")
  SECURE_OPTS=(--port 0 --tls-port "$port" --tls-cert-file "$certs/server.pem"
    --tls-key-file "$certs/server-key.pem" --tls-ca-cert-file "$certs/ca.pem"
    --tls-auth-clients yes --aclfile "$node/users.acl"
    --tls-client-cert-file "$certs/client.pem" --tls-client-key-file "$certs/client-key.pem")
}

secure_cli_opts() {
  local certs=$1 password=$2
  CLI_OPTS=(--tls --cacert "$certs/ca.pem" --cert "$certs/client.pem" --key "$certs/client-key.pem"
    --user esq --no-auth-warning --pass "$password")
}

cmd_start_secure() {
  (($# == 3)) || usage
  need_redis
  local dir certs port=$3 password
  check_port "$port"
  dir=$(abs_dir "$1")
  cmd_certs "$2"
  certs=$(abs_dir "$2")
  password=$(secure_password "$certs")
  secure_server_opts "$certs" "$dir/$port" "$port" "$password"
  start_server "$dir" "$port" "${SECURE_OPTS[@]}"
  secure_cli_opts "$certs" "$password"
  wait_ping "$dir" "$port"
  echo "export ESQ_TEST_REDIS_SECURE=rediss://esq:$password@$HOST:$port"
  echo "export ESQ_TEST_REDIS_TLS_DIR=$certs"
}

cmd_start_cluster_secure() {
  (($# == 5)) || usage
  need_redis
  local dir certs ports=("$3" "$4" "$5") port password
  for port in "${ports[@]}"; do
    check_port "$port"
  done
  dir=$(abs_dir "$1")
  cmd_certs "$2"
  certs=$(abs_dir "$2")
  password=$(secure_password "$certs")
  for port in "${ports[@]}"; do
    rm -f "$dir/$port/nodes.conf"
    secure_server_opts "$certs" "$dir/$port" "$port" "$password"
    # The cluster bus and replication speak TLS too; nodes authenticate to each other with
    # the same user (masterauth for replicas).
    start_server "$dir" "$port" "${SECURE_OPTS[@]}" --tls-cluster yes --tls-replication yes \
      --masteruser esq --masterauth "$password" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --cluster-port $((port + BUS_OFFSET))
  done
  secure_cli_opts "$certs" "$password"
  create_cluster "$dir" "rediss://esq:$password@" "ESQ_TEST_REDIS_CLUSTER_SECURE" "${ports[@]}"
  echo "export ESQ_TEST_REDIS_TLS_DIR=$certs"
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
  certs) cmd_certs "$@" ;;
  start-secure) cmd_start_secure "$@" ;;
  start-cluster-secure) cmd_start_cluster_secure "$@" ;;
  start-cluster-ha) cmd_start_cluster_ha "$@" ;;
  kill) cmd_kill "$@" ;;
  restart) cmd_restart "$@" ;;
  stop) cmd_stop "$@" ;;
  *) usage ;;
esac

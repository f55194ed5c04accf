#!/usr/bin/env bash
# Provisions throwaway Apache Cassandra 5 nodes for esq's tests, without Docker or a system
# package: the jars come from Maven Central (scripts/cassandra/pom.xml) and are cached outside
# the clone; each node runs as its own JVM on a loopback address (a single node on 127.0.0.1,
# node i of a ring on 127.0.0.i).
#
# Usage:
#   scripts/cassandra.sh fetch                  download Cassandra's jars (skipped when cached)
#   scripts/cassandra.sh start DIR PORT         write config into DIR, start a node serving CQL on PORT
#   scripts/cassandra.sh wait DIR PORT [SECS]   wait until a CQL query answers (default 180 s)
#   scripts/cassandra.sh stop DIR               stop the node started in DIR
#   scripts/cassandra.sh ring-start DIR PORT [N]  start an N-node ring (default 3) in DIR/node<i>, CQL
#                                               on 127.0.0.<i>:PORT; prints ESQ_TEST_CASSANDRA_RING=...
#                                               and ESQ_TEST_CASSANDRA_RING_DIR=... (for eval)
#   scripts/cassandra.sh ring-wait DIR [SECS]   wait until every node answers CQL and sees all peers up
#   scripts/cassandra.sh kill NODE_DIR          SIGKILL the node in NODE_DIR (e.g. DIR/node2)
#   scripts/cassandra.sh restart NODE_DIR       relaunch it with its config and data (same address, ports)
#   scripts/cassandra.sh wait-node NODE_DIR [SECS]  wait until it answers CQL and it and its running
#                                               peers see each other up (default 180 s)
#   scripts/cassandra.sh ring-stop DIR          stop every node of the ring in DIR
#
# Environment: ESQ_CACHE (default ~/.cache/esq) holds the jars; JAVA (default `java`) is the
# JDK 17 launcher; ESQ_CASSANDRA_HEAP (default 1g for a single node, 512m per ring node) is the
# heap size.
#
# Security (for the tests of store credentials and TLS), read by `start` and `wait`:
#   ESQ_CASSANDRA_AUTH=1        PasswordAuthenticator on; `wait` logs in as
#                               ESQ_CASSANDRA_USER / ESQ_CASSANDRA_PASSWORD (default
#                               cassandra/cassandra, the superuser Cassandra makes at start)
#   ESQ_CASSANDRA_TLS_DIR=DIR   CQL over TLS only (PEM: DIR/server.pem + DIR/server-key.pem,
#                               clients trust DIR/ca.pem; `scripts/redis.sh certs DIR` makes them)
set -euo pipefail

CASSANDRA_VERSION=5.0.6
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${ESQ_CACHE:-$HOME/.cache/esq}"
LIB="$CACHE/cassandra-$CASSANDRA_VERSION/lib"
JAVA="${JAVA:-java}"

die() {
    echo "cassandra.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '7,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The jar set is complete once cassandra-all itself is there: the copy goes into a temporary
# folder that is renamed at the end, so an interrupted download is never mistaken for a cache.
fetch() {
    if [[ -f "$LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]]; then
        echo "cassandra $CASSANDRA_VERSION: jars already in $LIB"
        return
    fi
    command -v mvn >/dev/null || die "mvn (Maven) is needed to fetch Cassandra"
    local tmp="$LIB.partial.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$LIB")"
    echo "cassandra $CASSANDRA_VERSION: fetching jars from Maven Central into $LIB"
    mvn -q -B -Dstyle.color=never -f "$SCRIPT_DIR/cassandra/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime
    [[ -f "$tmp/cassandra-all-$CASSANDRA_VERSION.jar" ]] || die "maven did not deliver cassandra-all"
    rm -rf "$LIB"
    mv "$tmp" "$LIB"
}

# Prints a TCP port that nothing listens on right now on every loopback address given
# (default 127.0.0.1), other than the ports listed in ESQ_AVOID_PORTS (space separated).
# A free loopback port below Linux's ephemeral range (32768 and up), so no outgoing connection
# can take it before Cassandra binds it (see free_port in scripts/test).
free_port() {
    python3 - "${@:-127.0.0.1}" <<'PY'
import os, random, socket, sys
avoid = {int(p) for p in os.environ.get("ESQ_AVOID_PORTS", "").split()}
def free(host, p):
    s = socket.socket()
    try:
        s.bind((host, p))
        return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(12000, 19999)
    if p not in avoid and all(free(h, p) for h in sys.argv[1:]):
        print(p)
        break
PY
}

# Exit 0 when something accepts connections on HOST:PORT.
port_in_use() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    sys.exit(0)
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

# Writes DIR/conf: a single node on 127.0.0.1 by default; a ring node gets its HOST, the SEEDS
# (host:storage_port, comma separated), its TOKEN and a DESCRIPTION for the header.
write_config() {
    local dir="$1" port="$2" storage_port="$3" host="${4:-127.0.0.1}"
    local seeds="${5:-127.0.0.1:$storage_port}" token="${6:-0}"
    local description="${7:-a single test node on loopback, nothing else}"
    cat >"$dir/conf/cassandra.yaml" <<EOF
# Written by scripts/cassandra.sh: $description.
cluster_name: esq-test
num_tokens: 1
initial_token: $token
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$seeds"
listen_address: $host
rpc_address: $host
storage_port: $storage_port
start_native_transport: true
native_transport_port: $port
data_file_directories:
  - $dir/data/data
commitlog_directory: $dir/data/commitlog
saved_caches_directory: $dir/data/saved_caches
hints_directory: $dir/data/hints
cdc_raw_directory: $dir/data/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
auto_snapshot: false
snapshot_before_compaction: false
paxos_variant: v2
# Tests create and drop many keyspaces: keep each one cheap.
column_index_cache_size: 2KiB
key_cache_size: 8MiB
counter_cache_size: 0MiB
# Writes and LWTs give up on the server before the clients (esq tests use 2 s request
# timeouts), so a batch the client gave up on cannot commit later.
cas_contention_timeout: 1500ms
write_request_timeout: 1500ms
read_request_timeout: 5000ms
range_request_timeout: 10000ms
request_timeout: 10000ms
# SAI and materialized views are not used; user-defined functions are not needed.
materialized_views_enabled: false
EOF
    if [[ "${ESQ_CASSANDRA_AUTH:-0}" == 1 ]]; then
        cat >>"$dir/conf/cassandra.yaml" <<EOF
# ESQ_CASSANDRA_AUTH=1: logins required (the superuser cassandra/cassandra is made at start).
authenticator:
  class_name: org.apache.cassandra.auth.PasswordAuthenticator
authorizer: CassandraAuthorizer
role_manager: CassandraRoleManager
EOF
    fi
    if [[ -n "${ESQ_CASSANDRA_TLS_DIR:-}" ]]; then
        local tls
        tls="$(cd "$ESQ_CASSANDRA_TLS_DIR" && pwd)"
        # The PEM keystore holds the key and the certificate chain in one file.
        cat "$tls/server-key.pem" "$tls/server.pem" >"$dir/conf/keystore.pem"
        chmod 600 "$dir/conf/keystore.pem"
        cat >>"$dir/conf/cassandra.yaml" <<EOF
# ESQ_CASSANDRA_TLS_DIR: CQL clients must speak TLS.
client_encryption_options:
  enabled: true
  optional: false
  require_client_auth: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: $dir/conf/keystore.pem
  truststore: $tls/ca.pem
EOF
    fi
    cat >"$dir/conf/logback.xml" <<EOF
<!-- Written by scripts/cassandra.sh: one plain log file, warnings and above on stderr. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$dir/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>WARN</level></filter>
    <encoder><pattern>%-5level %date{ISO8601} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE" />
    <appender-ref ref="STDERR" />
  </root>
</configuration>
EOF
}

# Exit 0 when the node of DIR runs: its pid file names a live process. A zombie is dead once
# it is alone: a JVM's main thread turns zombie while its other threads (holding the sockets)
# may still be exiting.
running() {
    local dir="$1"
    [[ -f "$dir/pid" ]] || return 1
    pid_alive "$(cat "$dir/pid")"
}

pid_alive() {
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] && return 0
    (($(ls "/proc/$pid/task" 2>/dev/null | wc -l) > 1))
}

start() {
    local dir="$1" port="$2"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    [[ -f "$LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]] || die "no Cassandra jars in $LIB: run '$0 fetch' first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if running "$dir"; then
        die "a node from $dir is already running (pid $(cat "$dir/pid"))"
    fi
    port_in_use 127.0.0.1 "$port" && die "port $port on 127.0.0.1 is already taken"
    local storage_port
    storage_port="$(ESQ_AVOID_PORTS="$port" free_port)"
    mkdir -p "$dir/conf" "$dir/data" "$dir/logs" "$dir/triggers"
    write_config "$dir" "$port" "$storage_port"
    save_node "$dir" 127.0.0.1 "$port" "$storage_port" "${ESQ_CASSANDRA_HEAP:-1g}"
    launch "$dir"
    echo "cassandra $CASSANDRA_VERSION: started pid $(cat "$dir/pid"), CQL on 127.0.0.1:$port (storage port $storage_port), logs in $dir/logs"
}

# What `restart` needs to relaunch a node exactly as it was: DIR/node.env (sourced by bash).
save_node() {
    local dir="$1"
    cat >"$dir/node.env" <<EOF
# Written by scripts/cassandra.sh: how this node was started (read by restart and wait-node).
NODE_HOST=$2
NODE_PORT=$3
NODE_STORAGE_PORT=$4
NODE_HEAP=$5
NODE_RING_DELAY_MS=${6:-100}
EOF
}

# Loads DIR/node.env into NODE_HOST, NODE_PORT, NODE_STORAGE_PORT and NODE_HEAP.
load_node() {
    local dir="$1"
    [[ -f "$dir/node.env" ]] || die "$dir holds no node started by this script (no $dir/node.env)"
    # shellcheck disable=SC1091
    source "$dir/node.env"
}

# Starts the JVM of the node whose config and node.env are in DIR (absolute), in the background,
# and notes in DIR/log_offset where this run's part of logs/system.log begins.
launch() {
    local dir="$1"
    load_node "$dir"
    if [[ -f "$dir/logs/system.log" ]]; then
        stat -c %s "$dir/logs/system.log" >"$dir/log_offset"
    else
        echo 0 >"$dir/log_offset"
    fi
    local jamm
    jamm="$(ls "$LIB"/jamm-*.jar | head -n 1)"
    # JPMS openings Cassandra needs on JDK 17 (conf/jvm17-server.options of Cassandra 5.0).
    local jpms=(
        -Djdk.attach.allowAttachSelf=true
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
        --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
    )
    # No JMX: without cassandra.jmx.*port the daemon opens no JMX listener, so there is no
    # port to clash with other nodes on the same machine.
    local props=(
        "-Dcassandra.config=file://$dir/conf/cassandra.yaml"
        "-Dcassandra.storagedir=$dir/data"
        "-Dcassandra.logdir=$dir/logs"
        "-Dlogback.configurationFile=file://$dir/conf/logback.xml"
        -Dcassandra-foreground=yes
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        "-Dcassandra.triggers_dir=$dir/triggers"
        "-Dcassandra.ring_delay_ms=${NODE_RING_DELAY_MS:-100}"
        -Dcassandra.superuser_setup_delay_ms=0
        -Dcassandra.native_transport_startup_delay_seconds=0
        -Dio.netty.tryReflectionSetAccessible=true
    )
    local heap="$NODE_HEAP"
    (
        cd "$dir"
        exec "$JAVA" -ea -Xss512k "-Xms$heap" "-Xmx$heap" -XX:+UseG1GC -XX:+ParallelRefProcEnabled \
            -XX:+ExitOnOutOfMemoryError \
            "-javaagent:$jamm" "${jpms[@]}" "${props[@]}" \
            -cp "$dir/conf:$LIB/*" org.apache.cassandra.service.CassandraDaemon \
            </dev/null >>"$dir/logs/stdout.log" 2>&1
    ) &
    echo $! >"$dir/pid"
}

# Sends a CQL OPTIONS/STARTUP handshake and then `SELECT release_version FROM system.local`
# over the native protocol (v4, no compression, no auth). Exit 0 only when the query returns a
# row: a listening socket alone does not mean the node can serve queries.
cql_ready() {
    python3 - "$1" "$2" <<'EOF'
import socket, struct, sys

def frame(stream, opcode, body):
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body

def read_frame(sock):
    head = b""
    while len(head) < 9:
        chunk = sock.recv(9 - len(head))
        if not chunk:
            raise OSError("connection closed")
        head += chunk
    _, _, _, opcode, length = struct.unpack(">BBhBi", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise OSError("connection closed")
        body += chunk
    return opcode, body

def string_map(d):
    out = struct.pack(">H", len(d))
    for k, v in d.items():
        out += struct.pack(">H", len(k)) + k.encode() + struct.pack(">H", len(v)) + v.encode()
    return out

try:
    import os, ssl
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=5)
    tls_dir = os.environ.get("ESQ_CASSANDRA_TLS_DIR")
    if tls_dir:
        context = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca.pem"))
        sock = context.wrap_socket(sock, server_hostname=host)
    sock.sendall(frame(1, 0x01, string_map({"CQL_VERSION": "3.0.0"})))
    opcode, _ = read_frame(sock)
    if opcode == 0x03:  # AUTHENTICATE: log in (the superuser appears a little after start)
        user = os.environ.get("ESQ_CASSANDRA_USER", "cassandra").encode()
        password = os.environ.get("ESQ_CASSANDRA_PASSWORD", "cassandra").encode()
        token = b"\0" + user + b"\0" + password
        sock.sendall(frame(1, 0x0F, struct.pack(">i", len(token)) + token))
        opcode, _ = read_frame(sock)
        if opcode != 0x10:  # AUTH_SUCCESS
            sys.exit(1)
    elif opcode != 0x02:  # READY
        sys.exit(1)
    query = b"SELECT release_version FROM system.local"
    body = struct.pack(">i", len(query)) + query + struct.pack(">HB", 0x0001, 0)  # consistency ONE
    sock.sendall(frame(2, 0x07, body))
    opcode, body = read_frame(sock)
    if opcode != 0x08:  # RESULT
        sys.exit(1)
    kind, = struct.unpack(">i", body[:4])
    sys.exit(0 if kind == 0x0002 else 1)  # Rows
except (OSError, struct.error, ImportError):
    sys.exit(1)
EOF
}

wait_ready() {
    local dir="$1" port="$2" timeout="${3:-180}"
    local started=$SECONDS
    [[ -f "$dir/pid" ]] || die "no node was started in $dir (no $dir/pid)"
    while ! cql_ready 127.0.0.1 "$port"; do
        if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
            tail -n 30 "$dir/logs/stdout.log" >&2 || true
            die "the node in $dir exited before answering CQL (see $dir/logs)"
        fi
        if ((SECONDS - started >= timeout)); then
            die "no CQL answer on 127.0.0.1:$port after ${timeout}s (see $dir/logs)"
        fi
        sleep 1
    done
    echo "cassandra: CQL answers on 127.0.0.1:$port after $((SECONDS - started))s"
}

stop() {
    local dir="$1"
    [[ -f "$dir/pid" ]] || {
        echo "cassandra: no pid file in $dir, nothing to stop"
        return
    }
    local pid
    pid="$(cat "$dir/pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cassandra: pid $pid ignored SIGTERM for 30s, killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/pid"
    echo "cassandra: stopped pid $pid"
}

# The ring commands. Node i of a ring lives in DIR/node<i> and listens on 127.0.0.<i> (the whole
# 127.0.0.0/8 reaches the loopback interface), with the same CQL port and storage port on every
# address. Every node is a seed and owns one token of an even split of the Murmur3 range, so no
# node bootstraps and all of them can start at once.

# Prints the absolute node folders of the ring in DIR, in node order.
ring_nodes() {
    local dir="$1"
    [[ -d "$dir" ]] || die "no ring in $dir"
    local n
    for n in $(ls -d "$dir"/node* 2>/dev/null | sed 's/.*node//' | sort -n); do
        echo "$(cd "$dir/node$n" && pwd)"
    done
}

ring_start() {
    local dir="$1" port="$2" count="${3:-3}"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    [[ "$count" =~ ^[0-9]+$ && "$count" -ge 1 && "$count" -le 9 ]] || die "N must be 1 to 9, got '$count'"
    [[ -f "$LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]] || die "no Cassandra jars in $LIB: run '$0 fetch' first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local hosts=() i
    for ((i = 1; i <= count; i++)); do
        hosts+=("127.0.0.$i")
        if running "$dir/node$i"; then
            die "node $i of $dir is already running (pid $(cat "$dir/node$i/pid"))"
        fi
        port_in_use "127.0.0.$i" "$port" && die "port $port on 127.0.0.$i is already taken"
    done
    local storage_port seeds="" nodes=""
    storage_port="$(ESQ_AVOID_PORTS="$port" free_port "${hosts[@]}")"
    for host in "${hosts[@]}"; do
        seeds+="${seeds:+,}$host:$storage_port"
        nodes+="${nodes:+,}$host:$port"
    done
    local tokens
    # shellcheck disable=SC2207
    tokens=($(python3 -c 'import sys; n = int(sys.argv[1]); print(*(-2**63 + i * (2**64 // n) for i in range(n)))' "$count"))
    for ((i = 1; i <= count; i++)); do
        local node="$dir/node$i"
        mkdir -p "$node/conf" "$node/data" "$node/logs" "$node/triggers"
        write_config "$node" "$port" "$storage_port" "127.0.0.$i" "$seeds" "${tokens[$((i - 1))]}" \
            "node $i of a $count-node test ring on loopback"
        # Gossip drops a peer that shows no tokens for ring_delay as a "fat client"; at 100 ms
        # nodes starting together dropped each other, and one then never got a schema change
        # (the ring test waited 10 minutes for agreement). 10 s covers a node's start.
        save_node "$node" "127.0.0.$i" "$port" "$storage_port" "${ESQ_CASSANDRA_HEAP:-512m}" 10000
        launch "$node"
        echo "cassandra $CASSANDRA_VERSION: node $i started, pid $(cat "$node/pid"), CQL on 127.0.0.$i:$port (storage port $storage_port, token ${tokens[$((i - 1))]}), logs in $node/logs" >&2
    done
    echo "ESQ_TEST_CASSANDRA_RING=$nodes"
    echo "ESQ_TEST_CASSANDRA_RING_DIR=$dir"
}

# Exit 0 when the node in NODE_DIR and its peers see each other up, judged by the gossip lines
# ("InetAddress /host:port is now UP/DOWN") each node logged since its last launch; with
# ALL=1 every peer must be running, otherwise peers that are down are left out. Prints what is
# missing on stderr when MISSING_TO_STDERR=1.
peers_up() {
    local node="$1" all="${2:-0}"
    python3 - "$node" "$all" <<'PY'
import os, re, sys
node, need_all = os.path.realpath(sys.argv[1]), sys.argv[2] == "1"
ring = os.path.dirname(node)

def env(d):
    out = {}
    with open(os.path.join(d, "node.env")) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.strip().split("=", 1)
                out[k] = v
    return out

def alive(d):
    try:
        pid = int(open(os.path.join(d, "pid")).read())
        os.kill(pid, 0)
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except (OSError, ValueError):
        return False

def statuses(d):
    """The last UP/DOWN the node in d logged for each peer address since its launch."""
    try:
        offset = int(open(os.path.join(d, "log_offset")).read())
        with open(os.path.join(d, "logs", "system.log"), "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except (OSError, ValueError):
        return {}
    seen = {}
    for m in re.finditer(r"InetAddress /([0-9.]+):\d+ is now (UP|DOWN)", text):
        seen[m.group(1)] = m.group(2)
    return seen

peers = [os.path.join(ring, d) for d in sorted(os.listdir(ring))
         if d.startswith("node") and os.path.isfile(os.path.join(ring, d, "node.env"))]
me = env(node)["NODE_HOST"]
mine = statuses(node)
missing = []
for peer in peers:
    if os.path.realpath(peer) == node:
        continue
    host = env(peer)["NODE_HOST"]
    if not alive(peer):
        if need_all:
            missing.append(f"{host} is not running")
        continue
    if mine.get(host) != "UP":
        missing.append(f"{me} does not see {host} up")
    if statuses(peer).get(me) != "UP":
        missing.append(f"{host} does not see {me} up")
if missing:
    print("; ".join(missing), file=sys.stderr)
    sys.exit(1)
PY
}

# Waits until the node in NODE_DIR answers CQL and it and its peers see each other up (every
# peer running with ALL=1).
wait_node() {
    local node="$1" timeout="${2:-180}" all="${3:-0}"
    local started=$SECONDS why
    node="$(cd "$node" && pwd)"
    load_node "$node"
    while true; do
        if ! running "$node"; then
            tail -n 30 "$node/logs/stdout.log" >&2 || true
            die "the node in $node is not running (see $node/logs)"
        fi
        if cql_ready "$NODE_HOST" "$NODE_PORT"; then
            if why="$(peers_up "$node" "$all" 2>&1)"; then
                break
            fi
        else
            why="no CQL answer on $NODE_HOST:$NODE_PORT"
        fi
        if ((SECONDS - started >= timeout)); then
            die "the node in $node is not ready after ${timeout}s: $why (see $node/logs)"
        fi
        sleep 1
    done
    echo "cassandra: $NODE_HOST:$NODE_PORT answers CQL and sees its peers up after $((SECONDS - started))s"
}

ring_wait() {
    local dir="$1" timeout="${2:-300}"
    local started=$SECONDS node left
    for node in $(ring_nodes "$dir"); do
        left=$((timeout - (SECONDS - started)))
        ((left > 0)) || left=1
        wait_node "$node" "$left" 1
    done
    echo "cassandra: the ring in $dir is up after $((SECONDS - started))s"
}

# SIGKILL: the node gets no chance to flush or to tell its peers; returns once the process is gone.
kill_node() {
    local node="$1" pid
    [[ -f "$node/pid" ]] || die "no node runs in $node (no pid file)"
    pid="$(cat "$node/pid")"
    kill -9 "$pid" 2>/dev/null || true
    local waited=0
    while running "$node"; do
        ((waited < 300)) || die "pid $pid still runs 30s after SIGKILL"
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$node/pid"
    # Gone means its ports are free too, so that `restart` can bind them at once.
    load_node "$node"
    while port_in_use "$NODE_HOST" "$NODE_PORT" || port_in_use "$NODE_HOST" "$NODE_STORAGE_PORT"; do
        ((waited < 300)) || die "$NODE_HOST:$NODE_PORT or :$NODE_STORAGE_PORT still accepts 30s after SIGKILL"
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "cassandra: killed pid $pid ($node)"
}

restart_node() {
    local node="$1"
    node="$(cd "$node" && pwd)"
    load_node "$node"
    [[ -f "$node/conf/cassandra.yaml" ]] || die "no config in $node/conf"
    running "$node" && die "the node in $node is already running (pid $(cat "$node/pid"))"
    port_in_use "$NODE_HOST" "$NODE_PORT" && die "port $NODE_PORT on $NODE_HOST is already taken"
    launch "$node"
    echo "cassandra $CASSANDRA_VERSION: restarted pid $(cat "$node/pid"), CQL on $NODE_HOST:$NODE_PORT (storage port $NODE_STORAGE_PORT), logs in $node/logs"
}

# SIGTERM to every node at once (they shut down in parallel), SIGKILL after 60 s.
ring_stop() {
    local dir="$1" node pids=()
    for node in $(ring_nodes "$dir"); do
        if running "$node"; then
            pids+=("$(cat "$node/pid")")
            kill "$(cat "$node/pid")" 2>/dev/null || true
        fi
    done
    local pid
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 60); do
            pid_alive "$pid" || break
            sleep 1
        done
        if pid_alive "$pid"; then
            echo "cassandra: pid $pid ignored SIGTERM for 60s, killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    for node in $(ring_nodes "$dir"); do
        rm -f "$node/pid"
    done
    echo "cassandra: stopped the ring in $dir (${#pids[@]} running nodes)"
}

cmd="${1:-}"
case "$cmd" in
ring-start)
    [[ $# -eq 3 || $# -eq 4 ]] || usage
    ring_start "$2" "$3" "${4:-3}"
    ;;
ring-wait)
    [[ $# -eq 2 || $# -eq 3 ]] || usage
    ring_wait "$2" "${3:-300}"
    ;;
kill)
    [[ $# -eq 2 ]] || usage
    kill_node "$2"
    ;;
restart)
    [[ $# -eq 2 ]] || usage
    restart_node "$2"
    ;;
wait-node)
    [[ $# -eq 2 || $# -eq 3 ]] || usage
    wait_node "$2" "${3:-180}"
    ;;
ring-stop)
    [[ $# -eq 2 ]] || usage
    ring_stop "$2"
    ;;
fetch)
    [[ $# -eq 1 ]] || usage
    fetch
    ;;
start)
    [[ $# -eq 3 ]] || usage
    start "$2" "$3"
    ;;
wait)
    [[ $# -eq 3 || $# -eq 4 ]] || usage
    wait_ready "$2" "$3" "${4:-180}"
    ;;
stop)
    [[ $# -eq 2 ]] || usage
    stop "$2"
    ;;
*)
    usage
    ;;
esac

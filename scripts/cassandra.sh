#!/usr/bin/env bash
# Provisions a throwaway single-node Apache Cassandra 5 for esq's tests, without Docker or a
# system package: the jars come from Maven Central (scripts/cassandra/pom.xml) and are cached
# outside the clone; the node runs as its own JVM, bound to 127.0.0.1 only.
#
# Usage:
#   scripts/cassandra.sh fetch                 download Cassandra's jars (skipped when cached)
#   scripts/cassandra.sh start DIR PORT        write config into DIR, start a node serving CQL on PORT
#   scripts/cassandra.sh wait DIR PORT [SECS]  wait until a CQL query answers (default 180 s)
#   scripts/cassandra.sh stop DIR              stop the node started in DIR
#
# Environment: ESQ_CACHE (default ~/.cache/esq) holds the jars; JAVA (default `java`) is the
# JDK 17 launcher; ESQ_CASSANDRA_HEAP (default 1g) is the heap size.
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
    sed -n '6,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
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

# Prints a TCP port on 127.0.0.1 that nothing listens on right now.
# A free loopback port below Linux's ephemeral range (32768 and up), so no outgoing connection
# can take it before Cassandra binds it (see free_port in scripts/test).
free_port() {
    python3 - <<'PY'
import random, socket
while True:
    p = random.randint(12000, 19999)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
PY
}

port_in_use() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    sys.exit(0)
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

write_config() {
    local dir="$1" port="$2" storage_port="$3"
    cat >"$dir/conf/cassandra.yaml" <<EOF
# Written by scripts/cassandra.sh: a single test node on loopback, nothing else.
cluster_name: esq-test
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$storage_port"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
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

start() {
    local dir="$1" port="$2"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    [[ -f "$LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]] || die "no Cassandra jars in $LIB: run '$0 fetch' first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        die "a node from $dir is already running (pid $(cat "$dir/pid"))"
    fi
    port_in_use "$port" && die "port $port on 127.0.0.1 is already taken"
    local storage_port
    storage_port="$(free_port)"
    mkdir -p "$dir/conf" "$dir/data" "$dir/logs" "$dir/triggers"
    write_config "$dir" "$port" "$storage_port"

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
        -Dcassandra.ring_delay_ms=100
        -Dcassandra.superuser_setup_delay_ms=0
        -Dcassandra.native_transport_startup_delay_seconds=0
        -Dio.netty.tryReflectionSetAccessible=true
    )
    local heap="${ESQ_CASSANDRA_HEAP:-1g}"
    (
        cd "$dir"
        exec "$JAVA" -ea -Xss512k "-Xms$heap" "-Xmx$heap" -XX:+UseG1GC -XX:+ParallelRefProcEnabled \
            -XX:+ExitOnOutOfMemoryError \
            "-javaagent:$jamm" "${jpms[@]}" "${props[@]}" \
            -cp "$dir/conf:$LIB/*" org.apache.cassandra.service.CassandraDaemon \
            </dev/null >"$dir/logs/stdout.log" 2>&1
    ) &
    echo $! >"$dir/pid"
    echo "cassandra $CASSANDRA_VERSION: started pid $(cat "$dir/pid"), CQL on 127.0.0.1:$port (storage port $storage_port), logs in $dir/logs"
}

# Sends a CQL OPTIONS/STARTUP handshake and then `SELECT release_version FROM system.local`
# over the native protocol (v4, no compression, no auth). Exit 0 only when the query returns a
# row: a listening socket alone does not mean the node can serve queries.
cql_ready() {
    python3 - "$1" <<'EOF'
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
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    tls_dir = os.environ.get("ESQ_CASSANDRA_TLS_DIR")
    if tls_dir:
        context = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca.pem"))
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
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
    while ! cql_ready "$port"; do
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

cmd="${1:-}"
case "$cmd" in
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

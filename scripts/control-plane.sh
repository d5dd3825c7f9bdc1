#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the test suite: etcd, kube-apiserver and
# kube-controller-manager, built from the Go modules pinned in tests/control-plane/.
#
#   scripts/control-plane.sh build   build the three binaries into target/control-plane/bin
#   scripts/control-plane.sh up      start them (own data dir, PKI, service-account issuer,
#                                    RBAC) and wait for /readyz; writes an admin kubeconfig
#   scripts/control-plane.sh down    stop exactly what `up` started (by recorded pid and
#                                    process start time), keep the logs
#   scripts/control-plane.sh env     print the shell exports that point kubectl and the tests at it
#   scripts/control-plane.sh serve   `up`, print "ready KUBECONFIG", and `down` once standard
#                                    input closes: how a test owns a private control plane
#                                    that ends with it, even when the test process is killed
#
# CONTROL_PLANE_DIR chooses where a control plane keeps its state (default
# target/control-plane/run), so several can run side by side. No kubelet, scheduler or
# node lifecycle controller runs: Deployments and DaemonSets get no pods, and Nodes are
# whatever a test creates.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
module="$repo/tests/control-plane"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${CONTROL_PLANE_BIN:-$target/control-plane/bin}"
dir="${CONTROL_PLANE_DIR:-$target/control-plane/run}"
binaries=(etcd kube-apiserver kube-controller-manager)
# The controllers the operator relies on. Everything that would need a kubelet or a
# scheduler (node lifecycle, ReplicaSets, DaemonSets, ...) stays off.
controllers="garbage-collector-controller,disruption-controller,namespace-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller"

# Go is a test tool here: use the machine's toolchain, never fetch another, and let the
# committed go.sum decide every module (checked against the checksum database by the
# proxy when it is reachable).
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

log() { echo "control-plane: $*" >&2; }
die() { log "$*"; exit 1; }

module_version() { (cd "$module" && go list -m -f '{{.Version}}' "$1"); }

build() {
    command -v go >/dev/null || die "the Go toolchain is needed to build the control plane (go not on PATH)"
    local version stamp
    version="$(module_version k8s.io/kubernetes)"
    stamp="$(cat "$module/go.mod" "$module/go.sum" "$0" | sha256sum | cut -c1-16)"
    if [ -f "$bin/.stamp" ] && [ "$(cat "$bin/.stamp")" = "$stamp" ] && all_built; then
        log "binaries are current in $bin (kubernetes $version, etcd $(module_version go.etcd.io/etcd/server/v3))"
        return
    fi
    mkdir -p "$bin"
    local major minor rest
    IFS=. read -r major minor rest <<<"${version#v}"
    # What kubernetes' own build stamps in, so clients and helm see v1.34.N, not v0.0.0.
    local ldflags=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    local started=$SECONDS
    log "building etcd $(module_version go.etcd.io/etcd/server/v3) and kubernetes $version into $bin (a cold build takes several minutes)"
    (cd "$module" && go build -o "$bin/etcd" go.etcd.io/etcd/server/v3)
    (cd "$module" && go build -ldflags "$ldflags" -o "$bin/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
    echo "$stamp" >"$bin/.stamp"
    log "built in $((SECONDS - started))s"
}

all_built() {
    local b
    for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A certificate signed by the control plane's CA: name, subject, extensions.
issue_cert() {
    local name="$1" subject="$2" ext="$3"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/pki/$name.key" -subj "$subject" \
        -out "$dir/pki/$name.csr" 2>/dev/null
    printf '%b' "$ext" >"$dir/pki/$name.ext"
    openssl x509 -req -in "$dir/pki/$name.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
        -CAcreateserial -days 3650 -extfile "$dir/pki/$name.ext" -out "$dir/pki/$name.crt" 2>/dev/null
}

pki() {
    [ -f "$dir/pki/admin.crt" ] && return
    mkdir -p "$dir/pki"
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$dir/pki/ca.key" -days 3650 \
        -subj "/CN=fleetpatch-test-ca" -out "$dir/pki/ca.crt" 2>/dev/null
    issue_cert apiserver "/CN=kube-apiserver" \
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    issue_cert admin "/O=system:masters/CN=admin" \
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    issue_cert controller-manager "/CN=system:kube-controller-manager" \
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub" 2>/dev/null
}

kubeconfig() {
    local user="$1" out="$2"
    cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: control-plane
  cluster:
    server: https://127.0.0.1:$(cat "$dir/apiserver.port")
    certificate-authority-data: $(base64 -w0 <"$dir/pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$dir/pki/$user.crt")
    client-key-data: $(base64 -w0 <"$dir/pki/$user.key")
contexts:
- name: control-plane
  context: {cluster: control-plane, user: $user, namespace: default}
current-context: control-plane
EOF
}

# Starts a binary in its own session (so it outlives this script) and records its pid
# and start time, which is how `down` knows the process is still the one it started.
start() {
    local name="$1"; shift
    setsid "$bin/$name" "$@" >>"$dir/logs/$name.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid $(start_time "$pid")" >"$dir/pids/$name"
}

start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# True when the recorded process is still the one we started.
ours() {
    local file="$dir/pids/$1" pid started
    [ -f "$file" ] || return 1
    read -r pid started <"$file"
    [ -n "$pid" ] && [ "$(start_time "$pid")" = "$started" ]
}

# Waits for a component; fails (returning 1, having shown the end of its log) when it
# exits or is not ready in time.
wait_for() {
    local what="$1" seconds="$2"; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "$what did not become ready in ${seconds}s; the end of its log:"
            tail -n 30 "$dir/logs/$what.log" >&2 || true
            return 1
        fi
        if ! ours "$what"; then
            log "$what exited; the end of its log:"
            tail -n 30 "$dir/logs/$what.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

admin_curl() {
    curl -fsS --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
        "https://127.0.0.1:$(cat "$dir/apiserver.port")$1"
}

up() {
    all_built || die "binaries missing in $bin: run '$0 build' first"
    if ours kube-apiserver; then
        log "already running in $dir"
        return
    fi
    command -v openssl >/dev/null || die "openssl is needed to make the control plane's certificates"
    mkdir -p "$dir/logs" "$dir/pids"
    rm -rf "$dir/etcd"
    pki
    # Ports are picked free, then bound by the components a moment later; another process
    # may take one in between (tests start control planes side by side), so a start that
    # fails is tried again on new ports.
    local attempt
    for attempt in 1 2 3; do
        if start_components; then
            log "up: kube-apiserver https://127.0.0.1:$(cat "$dir/apiserver.port"), kubeconfig $dir/admin.kubeconfig"
            return
        fi
        stop_all
        rm -rf "$dir/etcd"
        log "start $attempt failed; trying again on other ports"
    done
    die "the control plane did not start (see $dir/logs)"
}

start_components() {
    local etcd_port peer_port api_port
    etcd_port="$(free_port)"; peer_port="$(free_port)"
    api_port="${CONTROL_PLANE_PORT:-$(free_port)}"
    echo "$api_port" >"$dir/apiserver.port"

    start etcd --name control-plane --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "control-plane=http://127.0.0.1:$peer_port" \
        --unsafe-no-fsync --log-level warn
    wait_for etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/health" || return 1

    # An audit log of what fleetpatch's own ServiceAccounts do (metadata only): what the
    # controller really uses of its RBAC, and what a failing test did.
    cat >"$dir/audit-policy.yaml" <<'EOF2'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:fleetpatch-system"]
- level: None
EOF2
    start kube-apiserver --bind-address 127.0.0.1 --secure-port "$api_port" \
        --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/logs/audit.log" \
        --audit-log-maxsize 100 --audit-log-maxbackup 1 \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
        --client-ca-file "$dir/pki/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
        --authorization-mode RBAC --anonymous-auth=false \
        --allow-privileged=true --service-cluster-ip-range 10.0.0.0/24 \
        --profiling=false --event-ttl 1h --v 1
    wait_for kube-apiserver 120 admin_curl /readyz || return 1

    kubeconfig admin "$dir/admin.kubeconfig"
    kubeconfig controller-manager "$dir/controller-manager.kubeconfig"
    start kube-controller-manager --kubeconfig "$dir/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
        --use-service-account-credentials --root-ca-file "$dir/pki/ca.crt" \
        --controllers "$controllers" --leader-elect=false --secure-port 0 --v 1
    # The controller manager is ready for us once it has made the default ServiceAccount.
    wait_for kube-controller-manager 60 admin_curl /api/v1/namespaces/default/serviceaccounts/default
}

stop_one() {
    local name="$1" pid started
    ours "$name" || { rm -f "$dir/pids/$name"; return 0; }
    read -r pid started <"$dir/pids/$name"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while ours "$name" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if ours "$name"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$dir/pids/$name"
}

stop_all() {
    local name
    for name in kube-controller-manager kube-apiserver etcd; do stop_one "$name"; done
}

down() {
    [ -d "$dir/pids" ] || { log "nothing running in $dir"; return; }
    stop_all
    rm -rf "$dir/etcd"
    log "down: stopped what $dir/pids recorded"
}

serve() {
    trap stop_all EXIT
    trap 'exit 0' TERM INT HUP
    up
    echo "ready $dir/admin.kubeconfig"
    # Until whoever started us closes our standard input, or dies.
    cat >/dev/null || true
}

env_exports() {
    [ -f "$dir/admin.kubeconfig" ] || die "not up: run '$0 up' first"
    echo "export KUBECONFIG=$dir/admin.kubeconfig"
    echo "export FLEETPATCH_TEST_CLUSTER=$dir"
}

case "${1:-}" in
    build) build ;;
    up) up ;;
    down) down ;;
    env) env_exports ;;
    serve) serve ;;
    *) echo "usage: $0 build|up|down|env|serve" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Installs the fleetpatch agent on an external Linux host as a systemd service.
#
#   sudo deploy/install-agent.sh --server https://fleetpatch.example.com:8443 \
#       --token-file ./token [--ca-file ./ca.crt] [--binary ./fleetpatch] \
#       [--name web-1] [--label fleetpatch.io/group=web ...]
#
# Give it the agent build of fleetpatch, the agent alone and a fraction of the full
# binary's size (`cargo build --profile agent --no-default-features --features agent`,
# or /fleetpatch of the fleetpatch-agent image); the full build runs the agent too.
#
# Writes /usr/local/bin/fleetpatch, /etc/fleetpatch/agent.env (0600), the bootstrap
# token /etc/fleetpatch/bootstrap-token (0600), /etc/fleetpatch/ca.crt, the state
# directory /var/lib/fleetpatch (0700) and /etc/systemd/system/fleetpatch-agent.service,
# then enables and starts the service. Running it again updates the binary and the
# settings; a host that already registered needs no token.
#
#   --prefix DIR  installs below DIR instead of /, with the unit pointing there, and does
#                 not touch systemd (tests, image builds; needs no root)
#   --dry-run     prints what it would do and changes nothing
#   --no-start    installs and enables nothing in systemd
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

die() {
    echo "install-agent: $*" >&2
    exit 2
}

here="$(cd "$(dirname "$0")" && pwd)"
binary=""
server=""
token_file=""
ca_file=""
name=""
labels=()
prefix=""
dry_run=false
start=true
unit_template="$here/systemd/fleetpatch-agent.service"

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --server) server="${2:?--server needs a URL}"; shift 2 ;;
        --token-file) token_file="${2:?--token-file needs a path (- for standard input)}"; shift 2 ;;
        --ca-file) ca_file="${2:?--ca-file needs a path}"; shift 2 ;;
        --name) name="${2:?--name needs a value}"; shift 2 ;;
        --label) labels+=("${2:?--label needs key=value}"); shift 2 ;;
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --unit) unit_template="${2:?--unit needs a path}"; shift 2 ;;
        --dry-run) dry_run=true; shift ;;
        --no-start) start=false; shift ;;
        -h | --help) usage 0 ;;
        *) echo "install-agent: unknown option $1" >&2; usage 2 ;;
    esac
done

# Values end up in agent.env, where systemd splits the agent's flags at spaces: refuse
# anything that could split or quote.
[ -n "$server" ] || die "--server is required (the gateway URL, https://HOST:PORT)"
[[ "$server" =~ ^https?://[][A-Za-z0-9._~:/?#@!\&*+,\;=%-]+$ ]] || die "--server $server is not an http(s) URL"
if [ -n "$name" ]; then
    [[ "$name" =~ ^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$ ]] || die "--name $name is not a valid object name (lower case, digits, - and .)"
fi
for label in "${labels[@]}"; do
    [[ "$label" =~ ^[A-Za-z0-9./_-]+=[A-Za-z0-9._-]*$ ]] || die "--label $label is not key=value"
done
if [ -n "$prefix" ]; then
    [[ "$prefix" =~ ^/[A-Za-z0-9._/-]*$ ]] || die "--prefix must be an absolute path of letters, digits, ., _, - and /"
    prefix="${prefix%/}"
    start=false
fi
if [ -z "$binary" ] && [ -x ./fleetpatch ]; then binary=./fleetpatch; fi
[ -n "$binary" ] || die "--binary is required (the fleetpatch executable for this host)"
[ -f "$binary" ] || die "binary $binary not found"
[ -f "$unit_template" ] || die "unit $unit_template not found"
# The full build has the controller too: it works, but every host carries (and keeps in
# memory) code it never runs.
if [ -x "$binary" ] && "$binary" controller --help >/dev/null 2>&1; then
    echo "install-agent: note: $binary is the full fleetpatch build; the agent build is smaller (see --help)" >&2
fi
[ -z "$ca_file" ] || [ -f "$ca_file" ] || die "CA file $ca_file not found"

bin_path="$prefix/usr/local/bin/fleetpatch"
conf_dir="$prefix/etc/fleetpatch"
state_dir="$prefix/var/lib/fleetpatch"
unit_path="$prefix/etc/systemd/system/fleetpatch-agent.service"

token=""
if [ -n "$token_file" ]; then
    if [ "$token_file" = "-" ]; then
        token="$(cat)"
    else
        [ -f "$token_file" ] || die "token file $token_file not found"
        token="$(cat "$token_file")"
    fi
    token="$(printf '%s' "$token" | tr -d '\r\n')"
    [ -n "$token" ] || die "the bootstrap token is empty"
elif [ ! -f "$state_dir/credential.json" ]; then
    die "--token-file is required: this host has not registered yet"
fi

if [ "$dry_run" = false ] && [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --prefix DIR or --dry-run)"
fi

args=()
[ -n "$ca_file" ] && args+=(--ca-file "/etc/fleetpatch/ca.crt")
[ -n "$name" ] && args+=(--name "$name")
for label in "${labels[@]}"; do args+=(--label "$label"); done

# Paths inside the unit and agent.env follow the prefix, so a prefixed install is whole.
relocate() {
    if [ -n "$prefix" ]; then
        sed -e "s#/usr/local/bin/fleetpatch#$prefix/usr/local/bin/fleetpatch#g" \
            -e "s#/etc/fleetpatch#$prefix/etc/fleetpatch#g" \
            -e "s#/var/lib/fleetpatch#$prefix/var/lib/fleetpatch#g"
    else
        cat
    fi
}

env_content="$(
    echo "# fleetpatch agent settings, read by fleetpatch-agent.service."
    echo "FLEETPATCH_SERVER=$server"
    echo "FLEETPATCH_AGENT_ARGS=\"${args[*]}\""
)"
env_content="$(printf '%s\n' "$env_content" | relocate)"

step() { echo "install-agent: $*"; }

# write FILE MODE: standard input into FILE, created with MODE (never briefly readable).
write() {
    local file="$1" mode="$2"
    if [ "$dry_run" = true ]; then
        step "would write $file (mode $mode)"
        cat >/dev/null
        return
    fi
    local tmp
    tmp="$(mktemp "$(dirname "$file")/.install-agent.XXXXXX")"
    chmod "$mode" "$tmp"
    cat >"$tmp"
    mv -f "$tmp" "$file"
    step "wrote $file (mode $mode)"
}

make_dir() {
    local dir="$1" mode="$2"
    if [ "$dry_run" = true ]; then
        step "would create $dir (mode $mode)"
        return
    fi
    mkdir -p "$dir"
    chmod "$mode" "$dir"
}

make_dir "$(dirname "$bin_path")" 0755
make_dir "$conf_dir" 0700
make_dir "$state_dir" 0700
make_dir "$(dirname "$unit_path")" 0755

write "$bin_path" 0755 <"$binary"
printf '%s\n' "$env_content" | write "$conf_dir/agent.env" 0600
if [ -n "$token" ]; then
    printf '%s\n' "$token" | write "$conf_dir/bootstrap-token" 0600
fi
if [ -n "$ca_file" ]; then
    write "$conf_dir/ca.crt" 0644 <"$ca_file"
fi
relocate <"$unit_template" | write "$unit_path" 0644

if [ "$start" = true ]; then
    if [ "$dry_run" = true ]; then
        step "would run: systemctl daemon-reload; systemctl enable fleetpatch-agent.service; systemctl restart fleetpatch-agent.service"
    else
        systemctl daemon-reload
        systemctl enable fleetpatch-agent.service
        systemctl restart fleetpatch-agent.service
        step "fleetpatch-agent.service is running; follow it with: journalctl -u fleetpatch-agent -f"
    fi
fi

#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs formatting, lints and
# every test. `.ci/run` calls exactly this. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A fresh clone gains nothing from incremental state, and it doubles what the build
# writes to disk.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
# No test may reboot this machine: the agent's real rebooter refuses while this is set
# (.cargo/config.toml sets it too, for cargo run by hand).
export FLEETPATCH_FORBID_REAL_REBOOT=1

echo "== toolchain components"
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

echo "== Go (builds the test control plane; test tooling only)"
command -v go >/dev/null || { echo "the Go toolchain is needed to build the test control plane" >&2; exit 1; }
go version

echo "== system packages the tests use"
# dpkg-dev (dpkg-scanpackages) builds the local apt repository of the apt patcher test.
if ! command -v dpkg-scanpackages >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

echo "== the agent build: lints, the agent's subcommands and nothing else, its size"
# The binary external hosts and the node DaemonSet run (README, "The agent build").
cargo clippy --locked --no-default-features --features agent --all-targets -- -D warnings
# The agent's own tests on the agent build (its binary runs `agent exec`); about a minute.
cargo test --locked --no-default-features --features agent --lib --test agent_exec --test patchers --test powershell
cargo build --locked --profile agent --no-default-features --features agent --bin fleetpatch
agent_bin="${CARGO_TARGET_DIR:-$PWD/target}/agent/fleetpatch"
"$agent_bin" agent run --help >/dev/null
"$agent_bin" agent exec --help >/dev/null
for command in controller dev crds validate run duplicate; do
  if "$agent_bin" "$command" --help >/dev/null 2>&1; then
    echo "the agent build has the \`$command\` subcommand: it should be the agent alone" >&2
    exit 1
  fi
done
agent_size="$(stat -c %s "$agent_bin")"
echo "agent binary: $agent_size bytes"
if [ "$agent_size" -gt 12000000 ]; then
  echo "the agent binary is over 12 MB (issue 17's target)" >&2
  exit 1
fi

echo "== generated CRDs are current"
cargo run --locked --quiet -- crds --out-dir target/crds-check
diff -r crds target/crds-check

echo "== test tools (helm 4, newer kubectl)"
scripts/install-test-tools.sh

echo "== the real control plane (etcd, kube-apiserver, kube-controller-manager from their Go modules)"
scripts/control-plane.sh build
# One shared control plane for the suites that keep to their own namespaces; tests that
# run a controller start private ones (scripts/control-plane.sh serve). Stopped however
# this script ends.
export CONTROL_PLANE_DIR="${CARGO_TARGET_DIR:-$PWD/target}/control-plane/shared"
trap 'scripts/control-plane.sh down' EXIT
scripts/control-plane.sh down >/dev/null 2>&1 || true
scripts/control-plane.sh up
eval "$(scripts/control-plane.sh env)"
unset KUBECONFIG   # tests use their own kubeconfigs, never the shell's

echo "== cargo test (end-to-end suites on the real control plane)"
# Benchmarks print figures and are run on their own (see README), not as tests.
cargo test --locked --no-fail-fast --lib --bins --tests

echo "== the whole loop once more on fleetpatch dev (the README's one-machine setup)"
FLEETPATCH_TEST_SUBSTRATE=dev cargo test --locked --test e2e_fleet

#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs formatting, lints and
# every test. `.ci/run` calls exactly this. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== toolchain components"
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

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

echo "== generated CRDs are current"
cargo run --locked --quiet -- crds --out-dir target/crds-check
diff -r crds target/crds-check

echo "== test tools (helm 4, newer kubectl) for the dev server tests"
scripts/install-test-tools.sh

echo "== cargo test"
# Benchmarks print figures and are run on their own (see README), not as tests.
cargo test --locked --lib --bins --tests

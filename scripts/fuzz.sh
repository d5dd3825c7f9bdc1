#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets) with cargo fuzz on the nightly toolchain:
# scripts/fuzz.sh [SECONDS per target, default 60]. Both run side by side; each prints
# its executions and stops on the first crash (saved under fuzz/artifacts/TARGET/).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cd fuzz
cargo +nightly fuzz build -O
status=0
pids=()
for target in gateway_input executor_record; do
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 \
        >"../target/fuzz-$target.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
done
for target in gateway_input executor_record; do
    echo "== $target"
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|panicked|Done' "../target/fuzz-$target.log" || tail -n 20 "../target/fuzz-$target.log"
done
exit $status

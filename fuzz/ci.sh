#!/usr/bin/env bash
# The fuzz step of .ci/run: build all targets, run each for FUZZ_SECONDS (20) from the committed
# seeds. New inputs go to a scratch directory, never into fuzz/corpus/. Exits non-zero on a crash,
# a hang (-timeout) or a huge allocation (-rss_limit_mb); prints a reason and exits 0 when no
# nightly toolchain is there to run it.
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECONDS:-20}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped: no nightly toolchain (cargo +nightly --version failed)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (bounded to 10 minutes)"
    if ! timeout 600 cargo install cargo-fuzz --locked >/tmp/cargo-fuzz-install.log 2>&1; then
        echo "fuzz: skipped: cargo-fuzz is not installed and could not be installed" \
             "(see /tmp/cargo-fuzz-install.log)"
        exit 0
    fi
fi

start=$SECONDS
cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target"
    # Inputs that once crashed or hung a target replay first (each once, -runs=0).
    if [ -d "regressions/$target" ]; then
        echo "fuzz: $target: replaying regressions/$target"
        if ! cargo +nightly fuzz run "$target" "regressions/$target" -- -runs=0 \
            -rss_limit_mb=2048 -timeout=10 >"$scratch/$target.regressions.log" 2>&1; then
            tail -n 60 "$scratch/$target.regressions.log"
            echo "fuzz: $target FAILED on a committed regression input"
            exit 1
        fi
    fi
    echo "fuzz: $target for ${secs}s"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: over 2 GiB is a leak or an
    # unbounded allocation. libFuzzer exits non-zero on either, and on any panic.
    if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/"
        exit 1
    fi
    grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec' "$scratch/$target.log" |
        sed "s/^/fuzz: $target /"
done
echo "fuzz: all targets clean in $((SECONDS - start))s"

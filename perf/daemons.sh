# Sourced by the perf/ scripts (`. perf/daemons.sh NAME` from the repository's root): builds
# the release binaries (or takes them from $VMDEV_BIN_DIR, as perf/layouts.sh does), makes a
# run directory /tmp/vmdev-NAME.XXXXXX, starts vmdev-control there and stops everything
# started (and removes the directory) when the script exits. Sets B (the binaries), RUN,
# DP_ARGS (pins a datapath to the last CPU) and CLIENT_ARGS (pins a driver to CPU 0), both
# empty on one CPU. `start_datapath NAME [ARGS..]` starts a
# datapath and waits until the control plane lists it.
export PATH="$HOME/.cargo/bin:$PATH"
if [ -n "${VMDEV_BIN_DIR:-}" ]; then
  B=$VMDEV_BIN_DIR
else
  cargo build --release -q --workspace --bins
  B=$PWD/target/release
fi
RUN=$(mktemp -d "/tmp/vmdev-$1.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT
NCPU=$(nproc)
DP_ARGS=(); CLIENT_ARGS=()
if [ "$NCPU" -ge 2 ]; then DP_ARGS=(--cpu $((NCPU - 1))); CLIENT_ARGS=(--cpu 0); fi
export VMDEV_LOG=${VMDEV_LOG:-warn}
"$B/vmdev-control" --run-dir "$RUN" & PIDS+=($!)
for _ in $(seq 200); do [ -S "$RUN/control.sock" ] && break; sleep 0.05; done

start_datapath() {
  local name=$1; shift
  "$B/vmdev-datapath" --run-dir "$RUN" --name "$name" "$@" & PIDS+=($!)
  for _ in $(seq 200); do
    "$B/vmdevctl" --run-dir "$RUN" types 2>/dev/null | grep -q "^$name\b" && break; sleep 0.05
  done
}

#!/usr/bin/env bash
# Is a figure the code's or the linker's? Code placement alone moves whole-program rates here by
# up to 25 % (perf/RESULTS.md, sixth session), so one build's packed/split ratio says little.
# This relinks vmdev-perf and vmdev-datapath once per layout — the unshuffled link ("base"),
# then lld's --shuffle-sections with each seed, which puts every function at another address
# and nothing else changes — runs perf/rings.sh against each layout, and prints packed/split
# (p50 over neighbouring slices) per layout and the min / median / max across layouts.
# usage: perf/layouts.sh [SEEDS="1 2 3 4 5"] [SECONDS=4] [SIZES="64 1518"]
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"1 2 3 4 5"}; SECS=${2:-4}; SIZES=${3:-"64 1518"}
export PATH="$HOME/.cargo/bin:$PATH" CARGO_TARGET_DIR=$PWD/target/layouts
R=$CARGO_TARGET_DIR/release
OUT=$CARGO_TARGET_DIR/runs
rm -rf "$OUT"; mkdir -p "$OUT"
cargo build --release -q --workspace --bins
for layout in base $SEEDS; do
  dir=$CARGO_TARGET_DIR/$layout
  mkdir -p "$dir"
  for bin in vmdev-perf vmdev-datapath; do
    shuffle=()
    [ "$layout" = base ] || shuffle=(-C "link-arg=-Wl,--shuffle-sections=.text*=$layout")
    # Only the final link differs: the libraries are built once, `cargo rustc` relinks.
    cargo rustc --release -q -p "$bin" --bin "$bin" -- "${shuffle[@]}"
    cp "$R/$bin" "$dir/"
  done
  cp "$R/vmdev-control" "$R/vmdevctl" "$dir/"
  echo "== layout $layout"
  VMDEV_BIN_DIR=$dir bash perf/rings.sh "$SECS" "$SIZES" | tee "$OUT/$layout.txt"
done

# One row per layout: packed/split p50 for each case, then split and packed Mframes/s.
echo "== packed/split p50 by layout (vmdev's copying driver, one datapath, ${SECS} s per case)"
awk '
  FNR == 1 { layout = FILENAME; sub(/.*\//, "", layout); sub(/\.txt$/, "", layout); layouts[++nl] = layout }
  /^rings:/ { c = $2; sub(/-byte/, " B", c); if ($0 ~ /in-order/) c = c " in-order"; if (!(c in seen)) { seen[c] = 1; cases[++nc] = c } }
  /^packed\/split/ { for (i = 1; i <= NF; i++) if ($i == "p50") r[layout, c] = $(i + 1) }
  END {
    printf "%-8s", "layout"; for (j = 1; j <= nc; j++) printf "  %16s", cases[j]; print ""
    for (i = 1; i <= nl; i++) {
      printf "%-8s", layouts[i]
      for (j = 1; j <= nc; j++) printf "  %16s", r[layouts[i], cases[j]]
      print ""
    }
    split("min median max", names, " ")
    for (k = 1; k <= 3; k++) {
      printf "%-8s", names[k]
      for (j = 1; j <= nc; j++) {
        n = 0; delete v
        for (i = 1; i <= nl; i++) if ((layouts[i], cases[j]) in r) v[++n] = r[layouts[i], cases[j]] + 0
        for (a = 1; a <= n; a++) for (b = a + 1; b <= n; b++) if (v[b] < v[a]) { t = v[a]; v[a] = v[b]; v[b] = t }
        x = (k == 1) ? v[1] : (k == 3) ? v[n] : (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
        printf "  %16.3f", x
      }
      print ""
    }
  }' $(for l in base $SEEDS; do echo "$OUT/$l.txt"; done)

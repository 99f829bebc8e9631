#!/usr/bin/env bash
# Regenerate docs/figures/, the figures the README shows: run the quickstart (finished runs are
# skipped, so a second call only redraws), draw its figures, copy them here.
#   bash docs/make_figures.sh [OUT]      (OUT defaults to runs)
set -euo pipefail
out="${1:-runs}"
cd "$(dirname "$0")/.."
alignbench quickstart --out "$out"
alignbench plot "$out/quickstart" --formats png,pdf
for figure in win_rate_vs_sft head_to_head paired helpfulness_vs_harmlessness training_curves; do
    cp "$out/quickstart/figures/$figure.png" docs/figures/
done
cp "$out/quickstart/figures/results.md" "$out/quickstart/figures/bradley_terry.md" "$out/quickstart/figures/paired.md" docs/figures/
echo "docs/figures/ regenerated from $out/quickstart"

#!/usr/bin/env bash
# The measurement of experiments/intruders/README.md, in order; it resumes (recorded cells are
# skipped) and stops between two cells once /tmp/intruders.STOP exists.
# 1. the encoder: FedSVD, FFA-LoRA, FedAvg-LoRA at ε = 3, 6, ∞ with the main table's settings,
#    one seed at a time (every method and ε of seed 0 first), adapters kept in the record;
# 2. the causal LM: simulations/conf/causal-lm.toml at ε = 8 and ∞;
# 3. the spectra and forgetting of every recorded adapter (fedsvd-spectrum, recomputed whole).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
REC=experiments/intruders
SEEDS=${SEEDS:-0 1 2}
# experiments/main's run config, as its record ran (plain averaging, no update bound), so that
# the ε = 3 and 6 cells repeat its cells of the same seed
MAIN='strategy.num-rounds=30 strategy.eval-every=5 lora.train-head=false lora.head-init="class-names" train.batch-size=32 train.local-steps=10 model.compute-dtype="bfloat16" strategy.server-optimizer="none" strategy.max-weight-ratio=4 strategy.bound-updates=false'

for seed in $SEEDS; do
  $PY -m simulations.sweep --methods fedsvd,ffa,fedavg --epsilons 3,6,inf --seeds "$seed" \
    --lr-file experiments/lr-grid/learning_rates.toml --out results/intruders/encoder \
    --record "$REC/encoder" --record-adapters --stop-file /tmp/intruders.STOP --run-config "$MAIN"
  $PY -m simulations.sweep --methods fedsvd --epsilons 8,inf --seeds "$seed" --lr-file none \
    --out results/intruders/causal-lm --record "$REC/causal-lm" --record-adapters \
    --stop-file /tmp/intruders.STOP --run-config simulations/conf/causal-lm.toml \
    --run-config 'model.compute-dtype="bfloat16"'
done

$PY -m simulations.spectrum "$REC"/encoder/adapters/* --out "$REC/encoder/spectrum" \
  --forgetting sms --force
$PY -m simulations.spectrum "$REC"/causal-lm/adapters/* --out "$REC/causal-lm/spectrum" \
  --forgetting newsgroups --force
$PY "$REC/analyze.py" --write

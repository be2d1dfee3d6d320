#!/usr/bin/env bash
# The measurement of experiments/default-run-time/README.md: the default run in float32 and each
# candidate setting, seeds 0-2, one sub-record each; it resumes. Each sub-record also keeps the
# sweep's attempts file (the seconds of each whole `flwr run`, SuperLink start-up included).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
REC=experiments/default-run-time
F32='model.compute-dtype="float32"'

candidate() {  # candidate <name> [<run-config>]
  $PY -m simulations.sweep --methods fedsvd --epsilons 6 --seeds 0,1,2 --lr-file none \
    --out "results/default-run-time/$1" --record "$REC/$1" --stop-file /tmp/default-run-time.STOP \
    --run-config "$F32 ${2:-}"
  cp "results/default-run-time/$1/sweep-attempts.csv" "$REC/$1/attempts.csv"
}

candidate baseline
candidate eval-every-5 'strategy.eval-every=5'
candidate max-length-48 'model.max-length=48'
candidate max-length-32 'model.max-length=32'
candidate rounds-4 'strategy.num-rounds=4'
$PY "$REC/analyze.py"

#!/usr/bin/env bash
# The measurement of experiments/new-task-defaults/README.md: FedSVD with the run defaults at
# ε = 3 and ∞ on two tasks the defaults were not chosen on for their own sake; it resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
REC=experiments/new-task-defaults
SMS="$PWD/results/sms/sms-spam.csv"  # records hold this absolute path: resume from the same checkout
[ -f "$SMS" ] || $PY experiments/sms-check/sms_spam.py "$SMS"

$PY -m simulations.sweep --methods fedsvd --epsilons 3,inf --seeds 0,1,2 --lr-file none \
  --out results/new-task-defaults/sms --record "$REC/sms" --stop-file /tmp/new-task.STOP \
  --run-config "data.source=\"$SMS\" data.partitioner=\"iid\""
$PY -m simulations.sweep --methods fedsvd --epsilons 3,inf --seeds 0,1,2 --lr-file none \
  --out results/new-task-defaults/topics --record "$REC/topics" --stop-file /tmp/new-task.STOP \
  --run-config 'data.label-groups="topics"'
$PY "$REC/analyze.py"

#!/usr/bin/env bash
# The measurement of experiments/lr-transfer/README.md, in the order it was run. Each step is a
# `fedsvd-sweep --tune-lr` whose finished cells land in experiments/lr-transfer/<step>/cells;
# rerunning the script skips them (it resumes). The server rate of the adam arms is chosen by
# the pilot's fixed rule (choose_eta below) before any arm runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
REC=experiments/lr-transfer
TOPICS='data.label-groups="topics"'

sweep() {  # sweep <step> <methods> <lrs> <seeds> <run-config>
  mkdir -p "$REC/$1"
  $PY -m simulations.sweep --tune-lr --methods "$2" --epsilons 3 --seeds "$4" --lrs "$3" \
    --lr-file "$REC/$1/learning_rates.toml" --out "results/lr-transfer/$1" --record "$REC/$1" \
    --stop-file /tmp/lr-transfer.STOP ${5:+--run-config "$5"}
}

# 1. Pilot: FedAdam's server rate η on 20 Newsgroups, FedSVD and FedAvg-LoRA at client lr 0.5.
for eta in 0.003 0.01 0.03 0.1 0.3; do
  sweep "pilot-adam-eta$eta" fedsvd,fedavg 0.5 0 \
    "strategy.server-optimizer=\"adam\" strategy.server-learning-rate=$eta"
done

# The rule, fixed before the pilot ran: the η with the best mean final validation accuracy over
# the two methods; a tie goes to the smaller η.
ETA=$($PY - <<'PY'
import tomllib
best = None
for eta in ("0.003", "0.01", "0.03", "0.1", "0.3"):
    t = tomllib.load(open(f"experiments/lr-transfer/pilot-adam-eta{eta}/learning_rates.toml", "rb"))
    mean = sum(t[m]["validation-accuracy"][0] for m in ("fedsvd", "fedavg")) / 2
    if best is None or mean > best[0]:
        best = (mean, eta)
print(best[1])
PY
)
echo "[lr-transfer] pilot chose FedAdam η = $ETA"

# 2. The grid: 3 methods × client lr 0.125, 0.5, 2 (16×) × seeds 0, 1, without and with FedAdam,
#    on 20 Newsgroups and on its topic groups.
#    The plain arms name their server optimizer: the defaults that this record sets may differ.
ADAM="strategy.server-optimizer=\"adam\" strategy.server-learning-rate=$ETA"
PLAIN='strategy.server-optimizer="none"'
sweep 20ng-plain fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$PLAIN"
sweep 20ng-adam fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$ADAM"
sweep topics-plain fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$TOPICS $PLAIN"
sweep topics-adam fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$TOPICS $ADAM"

# 3. One normalised client rate for every method (train.learning-rate-scale = "delta-w"), plain
#    averaging, on both tasks.
DELTAW="train.learning-rate-scale=\"delta-w\" $PLAIN"
sweep 20ng-deltaw fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$DELTAW"
sweep topics-deltaw fedsvd,ffa,fedavg 0.125,0.5,2 0,1 "$TOPICS $DELTAW"

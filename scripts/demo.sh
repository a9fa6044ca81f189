#!/usr/bin/env bash
# The embedded demo (the project's main job): generate the synthetic bilingual shapes dataset, train a
# tiny M2-Encoder on the CPU with 2 gloo processes and grouped aggregation (GBA-ITC), then evaluate
# zero-shot retrieval and classification in English and Chinese on held-out images and print a table.
#
#   bash scripts/demo.sh [extra m2model.train options, e.g. --max_steps 300]
#
# Environment: DATA (default data/synth), RUN (default runs/demo), NPROC (default 2),
# M2_SKIP_SETUP=1 to use the current Python environment instead of scripts/setup_env.sh's .venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${M2_SKIP_SETUP:-}" ]; then
  bash scripts/setup_env.sh
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
DATA="${DATA:-data/synth}"
RUN="${RUN:-runs/demo}"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

if [ ! -f "$DATA/classes.json" ]; then
  echo "== generating the synthetic dataset in $DATA"
  python -m m2model.synth --out "$DATA"
fi

data_end=$(date +%s)
echo "== training ($NPROC processes, gloo, grouped aggregation) into $RUN"
rm -rf "$RUN"
python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m m2model.train \
  --config configs/demo_tiny.yaml --train_shards "$DATA/shards/train-*.tar" --output_dir "$RUN" "$@"
train_end=$(date +%s)

echo "== zero-shot evaluation on $(wc -l < "$DATA/val.jsonl") held-out images"
status=0
python -m m2model.eval_synth --data "$DATA" --checkpoint "$RUN" --json "$RUN/results.json" \
  --min-top1 80 --min-r1-over-chance 5 || status=$?
end=$(date +%s)
echo "== wall time: $((end - start)) s (data $((data_end - start)) s, training $((train_end - data_end)) s," \
  "evaluation $((end - train_end)) s)"
exit $status

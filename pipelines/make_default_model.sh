#!/usr/bin/env bash
# Rebuild the embedded default model (src/var_hf/default_model): a multi-scale VQ tokenizer and a class-conditional
# VAR trained from scratch on scikit-learn's handwritten digits with the project's own recipes, on the CPU.
# Takes about half an hour on 2 CPU cores. Reruns reproduce a model of the same quality (tests/test_default_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}

# 1. Data: 1,437 training digits and 360 held-out ones (for the tests' independent classifier), 32 px.
python pipelines/make_digits_dataset.py --output_dir "$OUT/digits" --resolution 32

# 2. Tokenizer: 32 px -> 4x4 latent, scales 1,2,3,4, 512 codes.
python pipelines/train_tokenizer.py --train_data_dir "$OUT/digits/train" --validation_data_dir "$OUT/digits/heldout" \
  --output_dir "$OUT/digits-tokenizer" --resolution 32 --patch_nums 1,2,3,4 --channel_multipliers 1,1,2,2 \
  --base_channels 64 --num_res_blocks 1 --codebook_size 512 --latent_channels 8 --train_batch_size 32 \
  --learning_rate 3e-4 --max_train_steps 1200 --validation_steps 400 --checkpointing_steps 400 --seed 0

# 3. Transformer from scratch on pre-tokenized digits (centre crops).
python pipelines/train_var.py --vqvae_model_name_or_path "$OUT/digits-tokenizer" --train_data_dir "$OUT/digits/train" \
  --resolution 32 --center_crop --depth 4 --width 192 --num_heads 4 --num_classes 10 --cache_tokens "$OUT/digits-tokens" \
  --train_batch_size 64 --max_train_steps 2000 --learning_rate 6e-4 --lr_warmup_steps 100 \
  --checkpointing_steps 500 --validation_steps 500 --output_dir "$OUT/digits-var" --seed 0

# 4. Install it as the package's default model, with a card that records these commands.
python - "$OUT/digits-var/pipeline" <<'PY'
import shutil, sys
from pathlib import Path
from var_hf import VARPipeline
from var_hf.model_card import write_model_card

source, target = Path(sys.argv[1]), Path("src/var_hf/default_model")
pipe = VARPipeline.from_pretrained(source)
if target.exists():
    shutil.rmtree(target)
pipe.save_pretrained(target)
commands = Path("pipelines/make_default_model.sh").read_text().split("set -euo pipefail", 1)[1]
write_model_card(
    target, pipe, repo_id="var_hf.DEFAULT_MODEL", title="var-hf default model: handwritten digits (32 px)",
    license="bsd-3-clause", datasets=["scikit-learn digits (UCI optdigits)"],
    training="Trained from scratch on CPU on the 1,437 training images of scikit-learn's handwritten digits "
    "(every 5th image held out), with `pipelines/make_default_model.sh`:\n\n```bash" + commands + "```",
)
print("installed", target)
PY

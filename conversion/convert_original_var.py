#!/usr/bin/env python
"""Convert upstream FoundationVision/VAR checkpoints into a var-hf pipeline folder (safetensors only).

    python conversion/convert_original_var.py --vae vae_ch160v4096z32.pth --var var_d16.pth --output var-d16
    python conversion/convert_original_var.py --vae vae_state.safetensors --var var_state.safetensors \
        --num-heads 4 --output my-pipeline

Inputs are `.safetensors` with upstream key names, or upstream `torch.save` files (`.pth`: raw state dicts or
training checkpoints), parsed without executing anything. The variant (depth, width, heads, classes, patch schedule,
shared AdaLN, attention mode) is read from the keys; `--num-heads` and `--patch-nums` cover what weights cannot say.
"""

import sys

from var_hf.convert_var_original import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Check on a device that var-hf's sync-free draw equals `torch.multinomial(probs, 1, replacement=True)` (upstream's)
token for token and leaves the generator in the same state. `python tests/benchmarks/check_sampling_draw.py --device cuda`"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from var_hf.sampling_var import filter_top_k_top_p_, sample_tokens  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--trials", type=int, default=50)
args = parser.parse_args()
mismatched_tokens = mismatched_states = 0
for trial in range(args.trials):
    shape = (1 + trial % 4, (1, 16, 100, 256)[trial % 4], 4096)
    logits = filter_top_k_top_p_(torch.randn(shape, device=args.device) * (1 + trial % 3), top_k=900, top_p=0.96)
    first = torch.Generator(device=args.device).manual_seed(trial)
    second = torch.Generator(device=args.device).manual_seed(trial)
    expected = torch.multinomial(logits.softmax(-1).view(-1, shape[-1]), 1, replacement=True, generator=first).view(shape[:2])
    mismatched_tokens += int(not torch.equal(sample_tokens(logits, second), expected))
    mismatched_states += int(not torch.equal(first.get_state(), second.get_state()))
print(json.dumps({"check": "draw_equals_multinomial", "device": args.device, "trials": args.trials,
                  "mismatched_tokens": mismatched_tokens, "mismatched_generator_states": mismatched_states}))
sys.exit(1 if mismatched_tokens or mismatched_states else 0)

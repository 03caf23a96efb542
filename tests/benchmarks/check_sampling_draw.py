#!/usr/bin/env python
"""Checks on a device (`python tests/benchmarks/check_sampling_draw.py --device cuda`), each printed as a JSON line:

- var-hf's sync-free draw equals `torch.multinomial(probs, 1, replacement=True)` (upstream's) token for token and leaves
  the generator in the same state;
- with the embedded default model: the static-buffer sampler (on CUDA: the whole sampling run as one captured graph, and
  one graph per step when editing) gives the plain pipeline's tokens and images bit for bit in float32, also when calls
  alternate inside and outside `torch.inference_mode()`;
- in bfloat16 a CPU generator (the contract's `torch.Generator()`) samples what a generator on the device seeded with
  one draw from it samples;
- `enable_model_cpu_offload()` samples what the pipeline on the device samples.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from var_hf import DEFAULT_MODEL, VARPipeline  # noqa: E402
from var_hf.sampling_var import filter_top_k_top_p_, sample_tokens  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--trials", type=int, default=50)
args = parser.parse_args()
failed = False


def report(row: dict, ok: bool) -> None:
    global failed
    failed |= not ok
    print(json.dumps({**row, "ok": ok}), flush=True)


mismatched_tokens = mismatched_states = 0
for trial in range(args.trials):
    shape = (1 + trial % 4, (1, 16, 100, 256)[trial % 4], 4096)
    logits = filter_top_k_top_p_(torch.randn(shape, device=args.device) * (1 + trial % 3), top_k=900, top_p=0.96)
    first = torch.Generator(device=args.device).manual_seed(trial)
    second = torch.Generator(device=args.device).manual_seed(trial)
    expected = torch.multinomial(logits.softmax(-1).view(-1, shape[-1]), 1, replacement=True, generator=first).view(shape[:2])
    mismatched_tokens += int(not torch.equal(sample_tokens(logits, second), expected))
    mismatched_states += int(not torch.equal(first.get_state(), second.get_state()))
report({"check": "draw_equals_multinomial", "device": args.device, "trials": args.trials,
        "mismatched_tokens": mismatched_tokens, "mismatched_generator_states": mismatched_states},
       mismatched_tokens == 0 and mismatched_states == 0)


def sample(pipe, labels, seed, generator_device=None, **kwargs):
    generator = torch.Generator(device=generator_device or args.device).manual_seed(seed)
    return pipe(class_labels=labels, generator=generator, output_type="pt", **kwargs)


def same(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.scale_indices, second.scale_indices)) and torch.equal(first.images, second.images)


torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
pipe = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).to(args.device)
pipe.set_progress_bar_config(disable=True)
mask = torch.ones(8, 8, device=args.device)
mask[2:6, 2:6] = 0
plain = [sample(pipe, [3, 5, 7], seed) for seed in (0, 1)]
plain_edit = sample(pipe, [4], 2, image=plain[0].images[:1], edit_mask=mask)
pipe.compile(cuda_graphs=True, compile_transformer=False, compile_decoder=False)
with torch.inference_mode():
    graphed = [sample(pipe, [3, 5, 7], 0)]
graphed.append(sample(pipe, [3, 5, 7], 1))
sampler = "whole-run CUDA graph" if getattr(pipe._sampling_graphs, "run_graph", None) is not None else "static buffers"
with torch.inference_mode():
    graphed_edit = sample(pipe, [4], 2, image=plain[0].images[:1], edit_mask=mask)
graphed_edit_again = sample(pipe, [4], 2, image=plain[0].images[:1], edit_mask=mask)
report({"check": "sampler_equals_plain_float32", "device": args.device, "sampler": sampler},
       all(same(a, b) for a, b in zip(graphed, plain)) and same(graphed_edit, plain_edit) and same(graphed_edit_again, plain_edit))

if args.device != "cpu":
    half = VARPipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16).to(args.device)
    half.set_progress_bar_config(disable=True)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(9)))
    report({"check": "bf16_cpu_generator_seeds_a_device_generator", "device": args.device},
           same(sample(half, [1, 2], 9, generator_device="cpu"), half(class_labels=[1, 2], output_type="pt",
                generator=torch.Generator(device=args.device).manual_seed(seed))))
    on_device = VARPipeline.from_pretrained(DEFAULT_MODEL).to(args.device)
    on_device.set_progress_bar_config(disable=True)
    expected = sample(on_device, [2, 6], 4)
    try:
        offloaded = VARPipeline.from_pretrained(DEFAULT_MODEL)
        offloaded.set_progress_bar_config(disable=True)
        offloaded.enable_model_cpu_offload()
        ok, error = same(sample(offloaded, [2, 6], 4), expected), None
        after = [model.device.type for model in (offloaded.transformer, offloaded.vqvae)]
    except Exception as caught:  # noqa: BLE001  (reported, and the other checks' results stand)
        ok, error, after = False, repr(caught)[:300], None
    report({"check": "model_cpu_offload_samples_as_on_device", "device": args.device, "models_after_call": after, "error": error}, ok)
sys.exit(1 if failed else 0)

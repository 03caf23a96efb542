#!/usr/bin/env python
"""Training-step benchmark: var-hf's VARTransformer vs upstream's VAR on the same random weights and tokens.

    python tests/benchmarks/bench_training.py --depth 16 --batch-size 32 --dtype bf16 --upstream upstream/
    python tests/benchmarks/bench_training.py --depth 2 --batch-size 4 --device cpu --dtype fp32 --steps 2   # smoke

Both run forward + backward + AdamW on pre-tokenized data (teacher-forcing input built once by the tokenizer):
upstream under its own autocast recipe, ours with `torch.autocast(dtype)` and a fused AdamW where available.
Reports images/s and peak GPU memory; prints and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampling import build_upstream, patch_nums_for  # noqa: E402

from var_hf import VARConfig, VARTransformer  # noqa: E402
from var_hf.convert_var_original import convert_var_transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256, choices=[256, 512])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--upstream", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", default=None)
    return parser.parse_args(argv)


def time_steps(step_fn, steps, warmup, device):
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step_fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    patch_nums = patch_nums_for(args.resolution)
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else contextlib.nullcontext()
    upstream = None
    if args.upstream:
        _, upstream = build_upstream(args.upstream, args.depth, patch_nums, args.device)
        ours = convert_var_transformer({k: v.cpu() for k, v in upstream.state_dict().items()}, patch_nums=list(patch_nums))
        upstream.train()
    else:
        ours = VARTransformer(VARConfig(depth=args.depth, embed_dim=64 * args.depth, num_heads=args.depth, patch_nums=patch_nums))
    ours = ours.to(args.device).train()
    if args.gradient_checkpointing:
        ours.gradient_checkpointing_enable()
    config = ours.config
    batch = args.batch_size
    labels = torch.randint(0, 1000, (batch,), device=args.device)
    targets = torch.randint(0, config.codebook_size, (batch, config.seq_len), device=args.device)
    teacher = torch.randn(batch, config.seq_len - config.first_scale_len, config.latent_channels, device=args.device)

    def make_step(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)

        def step():
            with autocast:
                logits = forward(model)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    results = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ours_s = time_steps(make_step(ours, lambda m: m(class_labels=labels, teacher_input=teacher).logits), args.steps, args.warmup, args.device)
    results["ours_img_per_s"] = batch / ours_s
    if cuda:
        results["ours_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if upstream is not None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        theirs_s = time_steps(make_step(upstream, lambda m: m(labels, teacher)), args.steps, args.warmup, args.device)
        results["upstream_img_per_s"] = batch / theirs_s
        results["speedup"] = theirs_s / ours_s
        if cuda:
            results["upstream_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"benchmark": "training", "depth": args.depth, "batch": batch, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "gradient_checkpointing": args.gradient_checkpointing, **results}
    print(json.dumps(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

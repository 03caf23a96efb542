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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampling import bench_commit, build_upstream, patch_nums_for  # noqa: E402

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
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile every block (as train_var.py --torch_compile); default: on for CUDA")
    parser.add_argument("--upstream-with-tokenizer", action="store_true",
                        help="also time upstream's trainer step as it runs: VQ-encoding the images every step")
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
        upstream_vae, upstream = build_upstream(args.upstream, args.depth, patch_nums, args.device)
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

    def make_step(model, forward, amp, scaler=None, prepare=None):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)

        def step():
            inputs = teacher if prepare is None else prepare()
            with amp:
                logits = forward(model, inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
            if scaler is not None:  # upstream's fp16 recipe (AmpOptimizer): scaled loss, unscale before clipping
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def measure(name, step):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()  # first step: compilation happens here
        if cuda:
            torch.cuda.synchronize()
        results[f"{name}_first_step_s"] = time.perf_counter() - start
        seconds = time_steps(step, args.steps, max(args.warmup - 1, 0), args.device)
        results[f"{name}_img_per_s"] = batch / seconds
        if cuda:
            results[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps({name: round(batch / seconds, 2)}), flush=True)
        if args.output:  # after every measurement: a later one running out of time loses nothing
            Path(args.output).write_text(json.dumps({**header, **results}, indent=1))
        return seconds

    if args.compile is None:
        args.compile = cuda  # the fast recipe (train_var.py --torch_compile) on GPUs
    header = {"benchmark": "training", "depth": args.depth, "batch": batch, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "commit": bench_commit(), "date": time.strftime("%Y-%m-%d"),
              "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile, "torch": torch.__version__}
    results = {}
    if args.compile:
        from var_hf.training_var import compile_transformer_blocks

        compile_transformer_blocks(ours)
    ours_s = measure("ours", make_step(ours, lambda m, x: m(class_labels=labels, teacher_input=x).logits, autocast))
    if upstream is not None:
        # Upstream's own recipe: fp16 autocast with a GradScaler on CUDA (its --fp16=1), float32 elsewhere.
        up_amp = torch.autocast("cuda", dtype=torch.float16) if cuda and args.dtype != "fp32" else contextlib.nullcontext()
        up_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**11, growth_interval=1000) if cuda and args.dtype != "fp32" else None
        theirs_s = measure("upstream", make_step(upstream, lambda m, x: m(labels, x), up_amp, up_scaler))
        results["speedup"] = theirs_s / ours_s
        if args.upstream_with_tokenizer:
            # Upstream's trainer tokenizes every batch: encoder + residual quantizer, then the teacher-forcing input.
            images = torch.rand(batch, 3, args.resolution, args.resolution, device=args.device) * 2 - 1
            def tokenize():
                with torch.no_grad():
                    return upstream_vae.quantize.idxBl_to_var_input(upstream_vae.img_to_idxBl(images))

            up_tok_s = measure("upstream_with_tokenizer", make_step(upstream, lambda m, x: m(labels, x), up_amp, up_scaler, prepare=tokenize))
            results["speedup_vs_upstream_trainer"] = up_tok_s / ours_s
    report = {**header, **results}
    print(json.dumps(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Sampling benchmark: var-hf's VARPipeline vs the upstream FoundationVision/VAR code on the same random weights.

    python tests/benchmarks/bench_sampling.py --depth 16 --batch-sizes 1 64 --dtype bf16 --upstream upstream/
    python tests/benchmarks/bench_sampling.py --depth 2 --batch-sizes 1 --device cpu --dtype fp32   # smoke test

`--variants eager graphs compiled float8` times the plain pipeline, then static buffers + the whole-run CUDA graph, then
the full `pipe.compile()`, then `pipe.compile(float8=True)`, each on the same weights, reporting the first call (compilation, capture) apart; the variants' tokens
for one seed are compared with the plain pipeline's.

With `--upstream PATH` (a checkout of FoundationVision/VAR, never committed) the upstream model is built with its
own code, randomly initialised, converted with our converter, and both are timed alternately in the same process
as a user calls them: upstream under its demo settings (fp16 autocast on CUDA, fp32 on the CPU), ours through the
public pipeline with `dtype`. In float32 both must draw the same tokens (generators on the same device), which is
checked. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from var_hf import MultiScaleVQModel, VARConfig, VARPipeline, VARTransformer  # noqa: E402
from var_hf.convert_var_original import convert_var_transformer, convert_vqvae  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256, choices=[256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--upstream", default=None, help="path to a FoundationVision/VAR checkout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="shorthand for --variants compiled (the default on CUDA)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="pipeline variants timed one after the other on the same weights: eager, graphs (static "
                             "buffers + CUDA graphs), compiled (pipe.compile()), float8 (pipe.compile(float8=True))")
    parser.add_argument("--generator", default="device", choices=["device", "cpu"],
                        help="our generator: on the pipeline's device (as upstream's g_seed), or the contract's "
                             "torch.Generator() on the CPU (half precision then seeds a device generator from it)")
    parser.add_argument("--output-type", default="pt", choices=["pt", "np", "pil"], help="our pipeline's output_type")
    parser.add_argument("--profile", default=None, help="profile one call per batch size (last variant), tables written to PREFIX_b{batch}.txt")
    parser.add_argument("--output", default=None, help="JSON file to write")
    return parser.parse_args(argv)


def patch_nums_for(resolution):
    return (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) if resolution == 256 else (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def build_upstream(path, depth, patch_nums, device):
    """Upstream's own builder, random init; its VQVAE convs are left uninitialised upstream, so fill them."""
    sys.path.insert(0, str(Path(path).resolve()))
    from models import build_vae_var  # noqa: E402  (upstream code, not ours)

    vae, var = build_vae_var(
        V=4096, Cvae=32, ch=160, share_quant_resi=4, device=device, patch_nums=patch_nums,
        num_classes=1000, depth=depth, shared_aln=depth >= 36,
    )
    with torch.no_grad():
        for name, param in vae.named_parameters():
            param.copy_(torch.randn_like(param) * 0.02 if param.ndim > 1 else torch.zeros_like(param))
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
    return vae.eval(), var.eval()


def build_ours(depth, patch_nums):
    config = VARConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums, shared_adaln=depth >= 36)
    torch.manual_seed(0)
    vqvae = MultiScaleVQModel(patch_nums=patch_nums)
    with torch.no_grad():
        for param in vqvae.parameters():
            param.normal_(0, 0.02)
    return VARTransformer(config), vqvae


def bench_commit():
    """The commit measured: $BENCH_COMMIT (a device copy's .git can be stale), else the checkout's HEAD."""
    return os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


VARIANTS = {
    # name: arguments of pipe.compile() applied on top of the previous variant (None: plain pipeline)
    "eager": None,
    "graphs": dict(compile_transformer=False, compile_decoder=False),  # static buffers + the whole-run CUDA graph
    "compiled": dict(),  # + torch.compile of the blocks and the decoder: what `pipe.compile()` does
    "float8": dict(float8=True),  # + float8 block matmuls: `pipe.compile(float8=True)` (approximate speed mode)
}


def float8_logits_check(config, device):
    """
    Teacher-forced logits on this device: bfloat16 and bfloat16 + float8 matmuls against float32 (relative L2 error;
    the documented bound for float8 is 5 %, from the tests' small checkpoints). Every weight is redrawn at the scale
    of its fan-in first: at initialisation the AdaLN gates (0.001) make every block nearly the identity, and the check
    would see the head only.
    """
    generator = torch.Generator().manual_seed(0)
    model = VARTransformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1))
    float32_state = model.state_dict()
    labels = torch.randint(0, config.num_classes, (2,), generator=generator).to(device)
    teacher = torch.randn(2, config.seq_len - config.first_scale_len, config.latent_channels, generator=generator).to(device)
    logits = {}
    for name, dtype, float8 in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False), ("float8", torch.bfloat16, True)):
        model = VARTransformer(config).to(device=device, dtype=dtype).eval()
        model.load_state_dict(float32_state)
        model.set_float8_matmuls(float8)
        with torch.no_grad():
            logits[name] = model(class_labels=labels, teacher_input=teacher).logits
        del model
    reference = logits["float32"]
    error = {name: float((logits[name] - reference).norm() / reference.norm()) for name in ("bfloat16", "float8")}
    return {"check": "teacher_forced_logits_relative_error_vs_float32", **error}


def sampler_in_use(pipe):
    """Which sampler the last call ran: the plain loop, the static-buffer runner, or its whole-run CUDA graph."""
    runner = getattr(pipe, "_sampling_graphs", None)
    if runner is None:
        return "plain"
    return "whole-run CUDA graph" if runner.run_graph is not None else "static buffers, no graph"


def profile_call(fn, path, device, rows=30):
    """One warmed-up, profiled call: what took the most device time (self time), as a table written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: compilation, graph capture, cuDNN autotuning stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)
    Path(path).write_text(table)
    return table


def main(argv=None):
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.dtype != "fp32"
    torch.backends.cudnn.allow_tf32 = args.dtype != "fp32"
    cuda = args.device.startswith("cuda")
    patch_nums = patch_nums_for(args.resolution)
    upstream = None
    if args.upstream:
        vae, var = build_upstream(args.upstream, args.depth, patch_nums, args.device)
        transformer = convert_var_transformer({k: v.cpu() for k, v in var.state_dict().items()}, patch_nums=list(patch_nums))
        vqvae = convert_vqvae({k: v.cpu() for k, v in vae.state_dict().items()}, patch_nums)
        upstream = var
    else:
        transformer, vqvae = build_ours(args.depth, patch_nums)
    dtype = DTYPES[args.dtype]
    vqvae = vqvae.to(dtype)
    vqvae.quantizer.float()  # the codebook and Phi convolutions stay float32, as from_pretrained(dtype=...) keeps them
    pipe = VARPipeline(transformer=transformer.to(dtype), vqvae=vqvae).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    # Default: what the README tells users to run, `pipe.compile()`, on GPUs; the plain pipeline on the CPU.
    variants = args.variants or (["compiled"] if args.compile or cuda else ["eager"])

    sample_kwargs = dict(guidance_scale=1.5, top_k=900, top_p=0.96)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda and args.dtype != "fp32" else contextlib.nullcontext()

    def ours_call(batch_labels, seed, output_type=None):
        generator = torch.Generator(device=args.device if args.generator == "device" else "cpu").manual_seed(seed)
        return pipe(class_labels=batch_labels, generator=generator, output_type=output_type or args.output_type, **sample_kwargs)

    def upstream_call(batch_labels, seed):
        label_tensor = torch.tensor(batch_labels, device=args.device)
        with torch.inference_mode(), autocast:
            return upstream.autoregressive_infer_cfg(B=len(batch_labels), label_B=label_tensor, g_seed=seed, cfg=1.5, top_k=900, top_p=0.96)

    results, checks = [], {}
    check_labels = [1, 2]
    for variant in variants:
        if VARIANTS[variant] is not None:
            pipe.compile(**VARIANTS[variant])
        for batch in args.batch_sizes:
            labels = [(7 * i) % 1000 for i in range(batch)]
            first_s, _ = timed(lambda: ours_call(labels, 0), args.device)  # compilation / graph capture happen here
            for _ in range(max(args.warmup - 1, 0)):
                ours_call(labels, 0)
            ours_times, theirs_times = [], []
            for step in range(args.repeats):
                dt, _ = timed(lambda: ours_call(labels, step), args.device)
                ours_times.append(dt)
                if upstream is not None:
                    if step == 0:
                        upstream_call(labels, 0)  # warm-up
                    dt_up, _ = timed(lambda: upstream_call(labels, step), args.device)
                    theirs_times.append(dt_up)
            row = {"variant": variant, "batch": batch, "first_call_s": first_s, "ours_s": statistics.median(ours_times),
                   "ours_img_per_s": batch / statistics.median(ours_times), "sampler": sampler_in_use(pipe), "ours_all_s": ours_times}
            if theirs_times:
                row.update(upstream_s=statistics.median(theirs_times), upstream_img_per_s=batch / statistics.median(theirs_times), upstream_all_s=theirs_times)
                row["speedup"] = row["upstream_s"] / row["ours_s"]
            results.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("all_s")}), flush=True)
        # Same seed, same weights: each variant's tokens, compared with the plain pipeline's below.
        checks[variant] = ours_call(check_labels, 5, "pt")
    if "eager" in checks:
        reference = checks["eager"]
        for variant, out in checks.items():
            same = all(torch.equal(a, b) for a, b in zip(reference.scale_indices, out.scale_indices))
            checks_row = {"check": f"{variant}_vs_eager", "tokens_identical": same,
                          "max_image_diff": float((reference.images - out.images).abs().max())}
            print(json.dumps(checks_row), flush=True)
            results.append(checks_row)
    if "float8" in variants:
        row = float8_logits_check(transformer.config, args.device)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.profile:  # a prefix: PREFIX_b{batch}.txt for every batch size, with the last variant
        for batch in args.batch_sizes:
            labels = [(7 * i) % 1000 for i in range(batch)]
            table = profile_call(lambda: ours_call(labels, 1), f"{args.profile}_b{batch}.txt", args.device)
            print("\n".join(table.splitlines()[:14]))

    if upstream is not None and args.dtype == "fp32" and (args.generator == "device" or not cuda):
        # Reference mode: identical tokens from the same seed (upstream keeps the generator on its device).
        theirs = upstream_call(check_labels, 5)
        out = checks.get("eager") or ours_call(check_labels, 5, "pt")
        row = {"check": "reference_mode_vs_upstream", "max_image_diff": float((out.images - theirs).abs().max())}
        print(json.dumps(row), flush=True)
        results.append(row)

    commit = bench_commit()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = {"benchmark": "sampling", "depth": args.depth, "resolution": args.resolution, "dtype": args.dtype, "generator": args.generator,
              "output_type": args.output_type,
              "device": device_name, "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

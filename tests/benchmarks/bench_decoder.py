#!/usr/bin/env python
"""VQ decoder benchmark: the largest part of sampling at big batches (latent (B, 32, 16, 16) -> (B, 3, 256, 256)).

    python tests/benchmarks/bench_decoder.py --batch-size 64 --upstream upstream/ --profile out/decoder
    python tests/benchmarks/bench_decoder.py --batch-size 2 --device cpu --repeats 1     # smoke test

Times, on the same random weights: upstream's decoder (`fhat_to_img` under its demo fp16 autocast) and ours in
`dtype` as plain (channels-first, eager), channels-last eager, and `pipe.compile()`'s compiled channels-last decoder
(GroupNorm from per-channel statistics, sub-pixel upsampling convolutions,
padded RGB convolution). Each variant's output is compared with the plain
one; `--profile PREFIX` writes each variant's top kernels to PREFIX_<variant>.txt. Prints and writes JSON.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampling import DTYPES, bench_commit, build_ours, build_upstream, patch_nums_for, profile_call, timed  # noqa: E402

from var_hf.convert_var_original import convert_vqvae  # noqa: E402
from var_hf.vq_var import compile_vq_decoder  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--upstream", default=None, help="path to a FoundationVision/VAR checkout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default=None, help="write each variant's top kernels to PREFIX_<variant>.txt")
    parser.add_argument("--output", default=None, help="JSON file to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    patch_nums = patch_nums_for(256)
    upstream = None
    if args.upstream:
        upstream, _ = build_upstream(args.upstream, 2, patch_nums, args.device)
        vqvae = convert_vqvae({k: v.cpu() for k, v in upstream.state_dict().items()}, patch_nums)
    else:
        _, vqvae = build_ours(2, patch_nums)
    vqvae = vqvae.to(DTYPES[args.dtype])
    vqvae.quantizer.float()
    vqvae = vqvae.to(args.device).eval()
    latent = torch.randn(args.batch_size, vqvae.config.latent_channels, 16, 16, device=args.device, generator=torch.Generator(args.device).manual_seed(0))

    def ours():
        with torch.no_grad():
            return vqvae.decode(latent).sample

    def theirs():
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return upstream.fhat_to_img(latent.float())

    variants = [("plain", None), ("channels_last_eager", "channels_last"), ("compiled", "compile")]
    if upstream is not None:
        variants.insert(0, ("upstream_fp16", "upstream"))  # its demo's fp16 autocast
    results, outputs = [], {}
    for name, how in variants:
        if how == "channels_last":
            vqvae.decoder.to(memory_format=torch.channels_last)
        elif how == "compile":
            compile_vq_decoder(vqvae.decoder)  # what pipe.compile() does to the decoder
        fn = theirs if how == "upstream" else ours
        first_s, out = timed(fn, args.device)
        times = [timed(fn, args.device)[0] for _ in range(args.repeats)]
        row = {"variant": name, "batch": args.batch_size, "first_call_s": first_s, "median_s": statistics.median(times),
               "img_per_s": args.batch_size / statistics.median(times)}
        outputs[name] = out.float()
        if "plain" in outputs:
            row["max_diff_vs_plain"] = float((outputs[name] - outputs["plain"]).abs().max())
        if args.profile:
            profile_call(fn, f"{args.profile}_{name}.txt", args.device)
        results.append(row)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    if "upstream_fp16" in outputs:
        row = {"check": "upstream_vs_plain", "max_diff": float((outputs["upstream_fp16"] - outputs["plain"]).abs().max())}
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"benchmark": "decoder", "dtype": args.dtype, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "commit": bench_commit(), "date": time.strftime("%Y-%m-%d"), "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

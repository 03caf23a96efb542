#!/usr/bin/env python
"""Mass sampling for evaluation (the ADM protocol: 50 images per class, PNG folder + `.npz` for OpenAI's evaluator).

    accelerate launch pipelines/sample_imagenet.py --model var-d16 --output_dir samples-d16 \
        --num_per_class 50 --batch_size 50 --guidance_scale 1.5 --top_k 900 --top_p 0.96 --dtype bf16

Image `k` of class `c` has the global index `c * num_per_class + k` and is written to `images/{index:06d}.png`.
Batches are seeded from `--seed` and their own number only, so the result does not depend on how many processes
share the work, and an interrupted run resumes by skipping the batches whose PNGs all exist. PNGs are encoded and
written by `--png_writers` threads while the next batch samples (encoding one 256 px PNG costs a CPU core ~10-15 ms,
more than a GPU takes to sample it). At the end the main process packs every PNG, in index order, into `samples.npz`
(`arr_0`: uint8 (N, H, W, 3), `arr_1`: labels).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from var_hf import DEFAULT_MODEL, VARPipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or Hub repo id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_per_class", type=int, default=50)
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class ids (default: all of the model's classes)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--top_k", type=int, default=900)
    parser.add_argument("--top_p", type=float, default=0.96)
    parser.add_argument("--more_smooth", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="pipe.compile() before sampling")
    parser.add_argument("--no_npz", action="store_true", help="only write the PNG folder")
    parser.add_argument("--png_writers", type=int, default=min(8, os.cpu_count() or 1), help="threads encoding and writing PNGs")
    return parser.parse_args(argv)


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def save_png(image: PIL.Image.Image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)  # a killed run never leaves a half-written PNG


def pack_npz(image_dir: Path, labels: np.ndarray, path: Path) -> None:
    """All PNGs in index order -> `arr_0` uint8 (N, H, W, 3) and `arr_1` labels, written atomically."""
    images = np.stack([np.asarray(PIL.Image.open(png_path(image_dir, i)).convert("RGB")) for i in range(len(labels))])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    tmp.replace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = VARPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.compile()
    classes = args.classes if args.classes else list(range(pipe.transformer.config.num_classes))
    labels = np.repeat(np.asarray(classes, dtype=np.int64), args.num_per_class)  # label of every global index
    output_dir = Path(args.output_dir)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "compile", "no_npz", "png_writers")}
    settings_file = output_dir / "sampling_settings.json"
    if accelerator.is_main_process:
        if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
            raise SystemExit(f"{output_dir} holds samples made with other settings ({settings_file}); use a new folder")
        settings_file.write_text(json.dumps(settings, indent=1))

    batches = [range(start, min(start + args.batch_size, len(labels))) for start in range(0, len(labels), args.batch_size)]
    mine = [(n, b) for n, b in enumerate(batches) if n % accelerator.num_processes == accelerator.process_index]
    todo = [(n, b) for n, b in mine if not all(png_path(image_dir, i).exists() for i in b)]
    total, remaining = sum(len(b) for _, b in mine), sum(len(b) for _, b in todo)
    made, start = 0, time.perf_counter()
    writing = deque()  # the PNG writes of the last batches, one list of futures per batch
    progress = tqdm(total=total, initial=total - remaining, disable=not accelerator.is_local_main_process, desc="sampling", unit="img")
    with progress, ThreadPoolExecutor(max_workers=max(args.png_writers, 1)) as writer:
        for number, batch in todo:
            generator = torch.Generator(device=pipe._execution_device).manual_seed(args.seed * 1_000_003 + number)
            out = pipe(class_labels=labels[batch.start : batch.stop].tolist(), guidance_scale=args.guidance_scale,
                       top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth, generator=generator, output_type="pil")
            writing.append([writer.submit(save_png, image, png_path(image_dir, index)) for index, image in zip(batch, out.images)])
            while len(writing) > 2:  # at most three batches' images queued while the next one samples
                for future in writing.popleft():
                    future.result()  # raises what the write raised
            made += len(batch)
            progress.update(len(batch))
            progress.set_postfix(img_per_s=f"{made / (time.perf_counter() - start):.2f}")
        for future in (future for batch_futures in writing for future in batch_futures):
            future.result()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not args.no_npz:
        pack_npz(image_dir, labels, output_dir / "samples.npz")
    return {"images": len(labels), "made": made, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()

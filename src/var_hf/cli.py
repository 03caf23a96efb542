"""`var-hf` command line: generate, edit, convert, push."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def _load(args):
    import torch

    from . import DEFAULT_MODEL, VARPipeline

    pipe = VARPipeline.from_pretrained(args.model or DEFAULT_MODEL, dtype=_dtype(args.dtype))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def _save_grid(images, output: str, nrow: int | None = None) -> None:
    from diffusers.utils import make_image_grid

    cols = nrow or min(len(images), 8)
    rows = -(-len(images) // cols)
    blank = images[0].copy()
    blank.paste((255, 255, 255), (0, 0, *blank.size))
    grid = make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the embedded model)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="VAR guidance (ramped over scales); default: the pipeline's")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"])
    parser.add_argument("--output", required=True, help="PNG file to write (a grid when several images)")


def _sampling_kwargs(args) -> dict:
    kwargs = {"more_smooth": args.more_smooth}
    for name in ("guidance_scale", "top_k", "top_p"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def _generator(pipe, seed: int):
    import torch

    return torch.Generator(device=pipe._execution_device).manual_seed(seed)


def cmd_generate(args) -> int:
    pipe = _load(args)
    labels = [int(x) if x.lstrip("-").isdigit() else x for x in args.class_label]
    labels = [label for label in labels for _ in range(args.num_images)]
    out = pipe(class_labels=labels, generator=_generator(pipe, args.seed), output_type="pil", **_sampling_kwargs(args))
    _save_grid(out.images, args.output, args.nrow)
    print(f"wrote {len(out.images)} image(s) to {args.output}")
    return 0


def cmd_edit(args) -> int:
    import PIL.Image

    from .editing import box_edit_mask

    pipe = _load(args)
    image = PIL.Image.open(args.image).convert("RGB")
    resolution = pipe.vqvae.resolution
    if image.size != (resolution, resolution):
        if not args.resize:
            print(f"error: the image is {image.size[0]}x{image.size[1]}, the model works at {resolution}x{resolution}; pass --resize", file=sys.stderr)
            return 2
        image = image.resize((resolution, resolution), PIL.Image.LANCZOS)
    box = tuple(float(v) for v in args.box.split(","))
    if len(box) != 4:
        print("error: --box takes y0,x0,y1,x1 as fractions of the image", file=sys.stderr)
        return 2
    mask = box_edit_mask(pipe.vqvae.patch_nums[-1], box, inpaint=not args.outpaint)
    label = args.class_label if args.class_label is not None else pipe.transformer.config.num_classes
    label = int(label) if str(label).isdigit() else label
    out = pipe(class_labels=[label] * args.num_images, image=image, edit_mask=mask, generator=_generator(pipe, args.seed), **_sampling_kwargs(args))
    _save_grid(out.images, args.output)
    print(f"wrote {len(out.images)} edited image(s) to {args.output}")
    return 0


def cmd_push(args) -> int:
    from .hub import push_folder_to_hub

    url = push_folder_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="var-hf", description="VAR next-scale prediction: sample, edit, convert, publish.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample class-conditional images")
    gen.add_argument("--class-label", nargs="+", default=["0"], help="class ids or names (e.g. 207 goldfish)")
    gen.add_argument("--num-images", type=int, default=1, help="images per class label")
    gen.add_argument("--nrow", type=int, default=None, help="images per grid row")
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    edit = sub.add_parser("edit", help="zero-shot in-painting / out-painting / class-conditional editing")
    edit.add_argument("--image", required=True)
    edit.add_argument("--box", required=True, help="y0,x0,y1,x1 fractions: the region to regenerate (or to keep with --outpaint)")
    edit.add_argument("--outpaint", action="store_true", help="keep the box and regenerate the outside")
    edit.add_argument("--class-label", default=None, help="edit toward this class (default: the null class, plain in-painting)")
    edit.add_argument("--num-images", type=int, default=1)
    edit.add_argument("--resize", action="store_true", help="resize the image to the model's resolution")
    _sampling_args(edit)
    edit.set_defaults(func=cmd_edit)

    sub.add_parser("convert", help="convert upstream checkpoints (flags of conversion/convert_original_var.py)")

    push = sub.add_parser("push", help="upload a pipeline folder to the Hub (configs, safetensors and card only)")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        from .convert_var_original import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

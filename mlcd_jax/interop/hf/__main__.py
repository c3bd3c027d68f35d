"""python -m mlcd_jax.interop.hf {import,export} SRC DST (or python -m mlcd_jax.interop ...): the
command line of the transformers mapping (`mlcd_jax/interop/hf/__init__.py`), above it and
`weights.py`."""

from __future__ import annotations

import argparse
import sys

from mlcd_jax.interop import hf, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd_jax.interop.hf", description=hf.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["import", "export"])
    parser.add_argument("src", help="import: a transformers checkpoint dir; export: a training "
                        "workdir, our model dir (or a transformers dir)")
    parser.add_argument("dst")
    parser.add_argument("--step", type=int, default=None,
                        help="export from a training workdir: this checkpoint step "
                        "(default: latest)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            model = hf.load_vision_model(args.src)
            native = hf.read_native(args.src)
            out = weights.save_model_dir(model, args.dst, native)
        else:
            model, _ = weights.load_encoder(args.src, args.step)
            native = weights.native_sizing(args.src)
            out = hf.save_vision_model(model, args.dst, native)
            layers = weights.load_region_layers(args.src, args.step)
            if layers is not None:  # RICE's region layers, beside (`evaluate --regions` reads them)
                print(f"export: {len(layers.blocks)} region layers: wrote "
                      f"{weights.save_region_layers(layers, args.dst)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    kind = "MLCDVisionModel" if cfg.pos == "rope" else "CLIPVisionModel"
    sized = f", {native} (preprocessor_config.json says how to size images)" if native else ""
    print(f"{args.command}: {cfg.pos} ViT width {cfg.width} depth {cfg.depth} heads {cfg.heads} "
          f"patch {cfg.patch}{f' → {cfg.embed_dim}' if cfg.embed_dim else ''}{sized}: wrote {out}"
          + (f" (transformers.{kind}.from_pretrained)" if args.command == "export" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weights to and from transformers (`mlcd-export`; also `python -m mlcd_jax.interop`):

    python -m mlcd_jax.interop.hf export RUN OUT [--step N]   # a training workdir → transformers
    python -m mlcd_jax.interop.hf export MODEL_DIR OUT        # our model dir → transformers
    python -m mlcd_jax.interop.hf import HF_DIR MODEL_DIR     # transformers → our model dir

The export loads with transformers' MLCDVisionModel (RoPE encoders) or CLIPVisionModel (CLIP-style);
a round trip is bit-exact. The mapping itself: mapping.py here.
"""

from __future__ import annotations

import sys

from absl import flags

from mlcd_jax.runtime import cli


def _verb(step: bool) -> flags.FlagValues:
    fv = flags.FlagValues()
    if step:
        flags.DEFINE_integer("step", None, "Export from a training workdir: this checkpoint step "
                             "(default: latest).", flag_values=fv)
    return fv


def convert(command: str, argv: list[str], step: int | None = None) -> None:
    """`import` or `export` of SRC to DST (argv: [prog, SRC, DST])."""
    from mlcd_jax.interop import weights
    from mlcd_jax.interop.hf import mapping as hf
    if len(argv) != 3:
        raise cli.UserError(f"{command} takes SRC and DST, got {argv[1:]}: e.g. "
                            f"python -m mlcd_jax.interop.hf {command} SRC DST")
    src, dst = argv[1:]
    if command == "import":
        model = hf.load_vision_model(src)
        native = hf.read_native(src)
        out = weights.save_model_dir(model, dst, native)
    else:
        model, _ = weights.load_encoder(src, step)
        native = weights.native_sizing(src)
        out = hf.save_vision_model(model, dst, native)
        layers = weights.load_region_layers(src, step)
        if layers is not None:  # RICE's region layers, beside (`evaluate --regions` reads them)
            print(f"export: {len(layers.blocks)} region layers: wrote "
                  f"{weights.save_region_layers(layers, dst)}")
    cfg = model.cfg
    kind = "MLCDVisionModel" if cfg.pos == "rope" else "CLIPVisionModel"
    sized = f", {native} (preprocessor_config.json says how to size images)" if native else ""
    print(f"{command}: {cfg.pos} ViT width {cfg.width} depth {cfg.depth} heads {cfg.heads} "
          f"patch {cfg.patch}{f' → {cfg.embed_dim}' if cfg.embed_dim else ''}{sized}: wrote {out}"
          + (f" (transformers.{kind}.from_pretrained)" if command == "export" else ""))


def commands() -> dict[str, cli.Subcommand]:
    imports, exports = _verb(step=False), _verb(step=True)
    return {
        "import": cli.Subcommand(lambda argv: convert("import", argv), imports,
                                 "SRC DST: a transformers MLCD / CLIP vision dir → our model dir."),
        "export": cli.Subcommand(lambda argv: convert("export", argv, exports.step), exports,
                                 "SRC DST: a training workdir, our model dir (or a transformers "
                                 "dir) → a transformers MLCD / CLIP vision dir."),
    }


def main(argv=None) -> int:
    return cli.run_subcommands(commands(), argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())

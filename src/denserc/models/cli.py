"""`denserc convert`: a peer's CLIP checkpoint (CLIPSelf/DeCLIP EVA-CLIP, or any open_clip one) as a DenseRC
model folder, so that the evaluation, detection and CAT-Seg commands run the peer's model on its own dense path.

    denserc convert eva_vitb16_coco_clipself_patches.pt runs/clipself_b16 --model EVA02-B-16 --peer clipself
"""
from __future__ import annotations

from .peers import PEERS
from .variants import CONSTRUCTIONS, GATINGS

# torch, open_clip and timm are imported inside `run_convert`, so that `denserc convert --help` answers at once.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="write a peer's CLIP checkpoint (CLIPSelf/DeCLIP EVA-CLIP, open_clip) as a model folder",
        description="Read CHECKPOINT (EVA-CLIP layout as CLIPSelf's and DeCLIP's training writes it, or any "
                    "open_clip layout; bare, {'state_dict': ...} or module.-prefixed) and write OUTPUT_DIR, a "
                    "model folder of the open_clip model --model (denserc.load, open_clip 'local-dir:'), every "
                    "tensor unchanged, recording the dense path that --peer (or --construction) names.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the peer's .pt/.pth/.bin/.safetensors file")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the model folder to write (new or empty)")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="open_clip model the weights belong to: EVA02-B-16, EVA02-L-14-336 for the peers' "
                             "EVA-CLIP checkpoints; ViT-B-16 and the like for open_clip ones")
    parser.add_argument("--peer", choices=sorted(PEERS), default=None,
                        help="record that peer's dense path: clipself = construction x+v, gating none; declip = "
                             "construction v, gating declip (its unscaled, RoPE-free q-q attention); plain = the one "
                             "--construction/--gating/--num-layers give")
    parser.add_argument("--construction", choices=CONSTRUCTIONS, default=None,
                        help="dense construction the folder records (instead of --peer)")
    parser.add_argument("--gating", choices=[g for g in GATINGS if g != "hsg"], default=None,
                        help="gating of multi-v (default: none; a converted checkpoint has no Head Selection Gate)")
    parser.add_argument("--num-layers", type=int, default=None, help="value layers of multi-v (default: 3)")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from .convert import convert_checkpoint
    result = convert_checkpoint(args.checkpoint, args.output_dir, args.model, peer=args.peer,
                                construction=args.construction, gating=args.gating, num_layers=args.num_layers)
    dropped = f", {len(result.dropped)} dropped ({_first(result.dropped)})" if result.dropped else ""
    settings = result.settings
    print(f"wrote {result.directory}: {args.model} from a {result.layout} checkpoint, {result.tensors} tensors "
          f"unchanged{dropped}; construction {settings['construction']}, gating {settings['gating']}, "
          f"num_layers {settings['num_layers']}")
    return 0


def _first(keys: list[str], shown: int = 2) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")

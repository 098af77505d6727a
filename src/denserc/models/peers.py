"""The peers' dense paths, as the construction settings a converted model folder records (no torch here: the
command line offers the peers as choices)."""
from __future__ import annotations

from .variants import GATINGS

# peer -> the construction, gating and num_layers it evaluates its model with; None: no preset.
PEERS = {
    # `EVAVisionTransformer.encode_dense`: the last block's `forward_without_attn` (x + proj(v), then the MLP
    # residual), the final norm and the head (CLIPSelf `src/open_clip/eva_clip/eva_vit_model.py`).
    "clipself": {"construction": "x+v", "gating": "none", "num_layers": 1},
    # `EVAVisionTransformer.encode_dense(mode="qq")`: the last block's `forward_without_rcffn`, i.e. `ss_attn`'s
    # softmax(q q^T) v without the 1/sqrt(d) scale and without RoPE, no residual, no MLP, then the final norm and
    # head (DeCLIP `src/open_clip/eva_clip/eva_vit_model.py`): construction v with gating declip.
    "declip": {"construction": "v", "gating": "declip", "num_layers": 1},
    # A checkpoint used as it is: the dense path comes from --construction/--gating/--num-layers.
    "plain": None,
}


def dense_settings(peer: str | None, construction: str | None, gating: str | None,
                   num_layers: int | None) -> dict:
    """The construction, gating and num_layers a converted folder records, from ``peer`` or the explicit ones.

    A converted checkpoint has no Head Selection Gate, so gating ``hsg`` is refused and gating defaults to
    ``none``.
    """
    if peer is not None and peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose one of {sorted(PEERS)}")
    explicit = {"construction": construction, "gating": gating, "num_layers": num_layers}
    given = [f"--{key.replace('_', '-')}" for key, value in explicit.items() if value is not None]
    preset = PEERS.get(peer)
    if preset is not None:
        if given:
            described = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in preset.items())
            raise ValueError(f"--peer {peer} sets {described} itself; drop {', '.join(given)}")
        return dict(preset)
    if construction is None:
        raise ValueError("say which dense path the folder records: --peer clipself, or --construction "
                         "(with --gating and --num-layers) for a plain checkpoint")
    if gating == "hsg":
        raise ValueError("--gating hsg needs a trained Head Selection Gate, which a converted checkpoint does not "
                         f"have; choose one of {[g for g in GATINGS if g != 'hsg']}")
    return {"construction": construction, "gating": gating or "none", "num_layers": num_layers}

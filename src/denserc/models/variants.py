"""The dense-construction variants by name (no torch here: the command line offers them as choices)."""

CONSTRUCTIONS = ("multi-v", "v", "x+v")
GATINGS = ("hsg", "none", "qk", "qq")
# The paper's Table 5 by the names its rows use: what to extract (x+v, v, multi-v, all without gating),
# then how multi-v combines its heads. "multi-v" is multi-v with gating "none".
TABLE5_VARIANTS = {"x+v": ("x+v", "none"), "v": ("v", "none"), "multi-v": ("multi-v", "none"),
                   "qk": ("multi-v", "qk"), "qq": ("multi-v", "qq"), "hsg": ("multi-v", "hsg")}

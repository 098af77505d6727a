"""Defaults that `segment`/`similarity_map` and their commands share (no torch here: `--help` shows them)."""

# Class names are nouns ("dog"); a heatmap query is already a phrase ("a red umbrella").
CLASS_TEMPLATES = ("a photo of a {}.",)
QUERY_TEMPLATES = ("{}",)
# Working resolution: the image's short side is resized to this many times the model's native size
# (448 px for a 224-px ViT-B/16, as in sliding-window OVSS on ADE20K).
SHORT_SIDE_PER_NATIVE = 2

"""Detections drawn on the image: one colour per class, a box and a "name score" tag per detection."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..viz.draw import palette

FONT_FRACTION = 1 / 30  # tag font height relative to the image's short side
MIN_FONT_SIZE, MAX_FONT_SIZE = 8, 32
MASK_ALPHA = 0.45


def draw_detections(image: Image.Image, boxes, labels, scores, class_names: list[str], masks=None) -> Image.Image:
    """A copy of ``image`` with each detection's box (and mask) in its class colour and a tag above it.

    boxes (D, 4) x1y1x2y2 in the image's pixels; labels index ``class_names``; masks (D, H, W) bool.
    """
    canvas = image.convert("RGB")
    colours = palette(len(class_names))
    if masks is not None and len(masks):
        pixels = np.asarray(canvas, dtype=np.float32)
        for mask, label in zip(np.asarray(masks, dtype=bool), np.asarray(labels)):
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * np.array(colours[label], np.float32)
        canvas = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    size = int(np.clip(round(min(canvas.size) * FONT_FRACTION), MIN_FONT_SIZE, MAX_FONT_SIZE))
    font = ImageFont.load_default(size=size)
    width = max(1, size // 6)
    order = np.argsort(np.asarray(scores))  # strongest drawn last, on top
    for k in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        colour = colours[int(labels[k])]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        tag = f"{class_names[int(labels[k])]} {float(scores[k]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), tag, font=font)
        lift = min(y1, bottom - top + 2)
        draw.rectangle((left, top - lift, right + 2, bottom - lift + 2), fill=colour)
        draw.text((x1 + 1, y1 - lift + 1), tag, fill=(255, 255, 255), font=font)
    return canvas

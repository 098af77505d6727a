"""encode_dense_with_taps: the tapped block outputs are open_clip's own intermediates; dense is unchanged."""
import pytest
import torch

import denserc

from helpers import TINY, randomize_


@pytest.mark.parametrize("construction,num_layers,taps", [("multi-v", 3, [3, 0, 2]), ("multi-v", 1, [3, 0, 2]),
                                                          ("v", 1, [3, 0, 2]), ("x+v", 1, [2, 0, 1])])
def test_taps_match_open_clip_intermediates_and_dense_is_encode_dense(construction, num_layers, taps, images):
    """Any order; the last block's own output for constructions that keep it (x+v replaces it: its last tap is
    the value-path block, tests/test_peer_paths.py)."""
    torch.manual_seed(0)
    model = randomize_(denserc.create_model(TINY, construction=construction, num_layers=num_layers)).eval()
    with torch.no_grad():
        dense, maps = model.encode_dense_with_taps(images, taps)
        reference = model.visual.forward_intermediates(images, indices=sorted(taps), intermediates_only=True)
        expected = dict(zip(sorted(taps), reference["image_intermediates"]))
        torch.testing.assert_close(dense, model.encode_dense(images), rtol=0, atol=0)
    assert [tuple(m.shape) for m in maps] == [(2, model.width, 14, 14)] * 3
    for tap, tapped in zip(taps, maps):
        torch.testing.assert_close(tapped, expected[tap], rtol=1e-4, atol=1e-5)


def test_taps_out_of_range_name_the_model_depth(tiny_model, images):
    with pytest.raises(ValueError, match=r"taps must be block indices in 0\.\.3 for ViT-Tiny-16 \(4 blocks\)"):
        tiny_model.encode_dense_with_taps(images, [1, 4])

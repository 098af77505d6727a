"""DenseRCModel.encode_dense_with_intermediates: block outputs equal open_clip's, dense output unchanged."""
import pytest
import torch

from test_model import block_inputs, variant


@pytest.mark.parametrize("construction, num_layers", [("multi-v", 3), ("x+v", 1)])
def test_intermediates_are_open_clip_block_outputs(tiny_model, images, construction, num_layers):
    model = variant(tiny_model, construction=construction, gating="none", num_layers=num_layers)
    inputs = block_inputs(model, images)  # input of block i+1 = output of block i
    with torch.no_grad():
        dense, taps = model.encode_dense_with_intermediates(images, [2, 0])
        torch.testing.assert_close(dense, model.encode_dense(images))
    for index, tap in zip([2, 0], taps):
        expected = inputs[index + 1][:, 1:].transpose(1, 2).reshape(images.shape[0], model.width, 14, 14)
        torch.testing.assert_close(tap, expected, rtol=1e-5, atol=1e-5)


def test_intermediate_index_out_of_range_is_rejected(tiny_model, images):
    with pytest.raises(ValueError, match=r"out of range: .* has 4 blocks and the dense path yields outputs of "
                                         r"blocks 0\.\.2"):
        tiny_model.encode_dense_with_intermediates(images, [3])

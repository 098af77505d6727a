"""`denserc convert`: the peers' checkpoints (CLIPSelf/DeCLIP EVA-CLIP layout, plain open_clip) as model folders.

The EVA-CLIP checkpoints are synthesised from a random open_clip EVA02-Tiny-16 by renaming its tensors to the
names of BAAI's EVA-CLIP code as CLIPSelf vendors it (``wusize/CLIPSelf`` ``src/open_clip/eva_clip/``:
``eva_vit_model.py`` for the image tower, ``transformer.py`` ``TextTransformer`` for the text tower) and
wrapping them as its training saves them (``src/training/main.py``).
"""
import json
import math
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import denserc
from denserc.cli import main
from denserc.models.convert import convert_checkpoint, read_checkpoint
from denserc.models.peers import dense_settings
from denserc.models.serialization import CLIP_WEIGHTS, DENSERC_CONFIG

from helpers import randomize_
from eval_fixtures import grey_image, grey_levels, write_panoptic, write_templates

EVA = "EVA02-Tiny-16"
# open_clip EVA02 (timm Eva) -> EVA-CLIP names, inside visual.blocks.N (written from eva_vit_model.py's modules)
EVA_CLIP_BLOCK_NAMES = {"attn.q_proj.bias": "attn.q_bias", "attn.v_proj.bias": "attn.v_bias",
                        "attn.norm.": "attn.inner_attn_ln.", "mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.",
                        "mlp.fc2.": "mlp.w3.", "mlp.norm.": "mlp.ffn_ln."}
PT_SEQ_LEN = 16  # EVA02-CLIP-B-16.json "pt_hw_seq_len"


def eva_clip_name(open_clip_key: str) -> str:
    """The EVA-CLIP name of an open_clip EVA02 key (text tower and logit_scale: the same)."""
    if not open_clip_key.startswith("visual.trunk."):
        return open_clip_key
    key = "visual." + open_clip_key[len("visual.trunk."):]
    for ours, theirs in EVA_CLIP_BLOCK_NAMES.items():
        key = key.replace(ours, theirs)
    return key


def eva_clip_rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-CLIP's `VisionRotaryEmbeddingFast` tables, (grid * grid, head_dim) each (CLIPSelf eva_clip/rope.py)."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim))
    t = torch.arange(grid) / grid * PT_SEQ_LEN
    freqs = (t[:, None] * freqs).repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r=2
    freqs = torch.cat((freqs[:, None, :].expand(grid, grid, dim), freqs[None, :, :].expand(grid, grid, dim)), -1)
    return freqs.cos().reshape(grid * grid, -1), freqs.sin().reshape(grid * grid, -1)


def eva_clip_state(clip) -> dict[str, torch.Tensor]:
    """``clip``'s weights as EVA-CLIP's ``CustomCLIP.state_dict()`` holds them, RoPE tables included."""
    state = {eva_clip_name(key): tensor.clone() for key, tensor in clip.state_dict().items()}
    trunk = clip.visual.trunk
    cos, sin = eva_clip_rope_tables(trunk.blocks[0].attn.head_dim, trunk.patch_embed.grid_size[0])
    for prefix in ["visual.rope."] + [f"visual.blocks.{i}.attn.rope." for i in range(len(trunk.blocks))]:
        state[prefix + "freqs_cos"], state[prefix + "freqs_sin"] = cos, sin
    return state


@pytest.fixture(scope="module")
def eva_clip():
    """A random open_clip EVA02-Tiny-16 (every weight non-trivial) and its EVA-CLIP-layout state."""
    torch.manual_seed(0)
    clip = randomize_(denserc.create_model(EVA, construction="x+v", gating="none").clip, seed=5).eval()
    return clip, eva_clip_state(clip)


def save_as_clipself_training(state: dict, path, prefix: str = "") -> None:
    """What CLIPSelf's and DeCLIP's `src/training/main.py` write at the end of an epoch."""
    torch.save({"epoch": 6, "name": "clipself", "state_dict": {prefix + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98)}]}}, path)


def eva_clip_image_embedding(state: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """EVA-CLIP's image forward written out from its checkpoint (CLIPSelf eva_vit_model.py, `forward`, with
    subln, SwiGLU, RoPE on the patch tokens from the checkpoint's own tables, no layer scale)."""
    def linear(x, name, bias=True):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"] if bias else None)

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def rotate_half(x):
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)

    def rope(x):  # (B, H, 1 + N, d): the cls token is not rotated
        cos, sin = state["visual.rope.freqs_cos"], state["visual.rope.freqs_sin"]
        patches = x[:, :, 1:] * cos + rotate_half(x[:, :, 1:]) * sin
        return torch.cat((x[:, :, :1], patches), dim=2)

    x = F.conv2d(images, state["visual.patch_embed.proj.weight"], state["visual.patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((state["visual.cls_token"].expand(len(x), -1, -1), x), dim=1) + state["visual.pos_embed"]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"visual\.blocks\.(\d+)\.", k))})
    for i in blocks:
        b = f"visual.blocks.{i}"
        u = norm(x, f"{b}.norm1")
        q = F.linear(u, state[f"{b}.attn.q_proj.weight"], state[f"{b}.attn.q_bias"])
        k = F.linear(u, state[f"{b}.attn.k_proj.weight"])
        v = F.linear(u, state[f"{b}.attn.v_proj.weight"], state[f"{b}.attn.v_bias"])
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        out = (attention @ v).transpose(1, 2).flatten(2)
        x = x + linear(norm(out, f"{b}.attn.inner_attn_ln"), f"{b}.attn.proj")
        u = norm(x, f"{b}.norm2")
        hidden = F.silu(linear(u, f"{b}.mlp.w1")) * linear(u, f"{b}.mlp.w2")
        x = x + linear(norm(hidden, f"{b}.mlp.ffn_ln"), f"{b}.mlp.w3")
    return linear(norm(x, "visual.norm")[:, 0], "visual.head")


def eva_clip_text_embedding(state: dict, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """EVA-CLIP's `TextTransformer.forward` written out from its checkpoint (causal mask, GELU, argmax pooling)."""
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    x = state["text.token_embedding.weight"][tokens] + state["text.positional_embedding"]
    causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"text\.transformer\.resblocks\.(\d+)\.", k))})
    for i in layers:
        b = f"text.transformer.resblocks.{i}"
        q, k, v = F.linear(ln(x, f"{b}.ln_1"), state[f"{b}.attn.in_proj_weight"],
                           state[f"{b}.attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        attention = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + causal).softmax(-1)
        out = (attention @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(out, state[f"{b}.attn.out_proj.weight"], state[f"{b}.attn.out_proj.bias"])
        u = ln(x, f"{b}.ln_2")
        x = x + F.linear(F.gelu(F.linear(u, state[f"{b}.mlp.c_fc.weight"], state[f"{b}.mlp.c_fc.bias"])),
                         state[f"{b}.mlp.c_proj.weight"], state[f"{b}.mlp.c_proj.bias"])
    x = ln(x, "text.ln_final")
    return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ state["text.text_projection"]


def test_clipself_checkpoint_arrives_unchanged_and_records_x_plus_v(eva_clip, tmp_path):
    clip, state = eva_clip
    checkpoint = tmp_path / "epoch_6.pt"
    save_as_clipself_training(state, checkpoint, prefix="module.")
    result = convert_checkpoint(checkpoint, tmp_path / "clipself", EVA, peer="clipself")

    written = load_file(tmp_path / "clipself" / CLIP_WEIGHTS)
    assert {eva_clip_name(key) for key in written} == {k for k in state if ".rope." not in k}
    for key, tensor in written.items():
        assert torch.equal(tensor, state[eva_clip_name(key)]), key
    assert sorted(result.dropped) == sorted(k for k in state if ".rope." in k)  # 2 + 2 per block, timm recomputes them
    config = json.loads((tmp_path / "clipself" / DENSERC_CONFIG).read_text())
    assert (config["model_name"], config["construction"], config["gating"], config["num_layers"]) == \
        (EVA, "x+v", "none", 1)
    # open_clip loads the folder as it is
    again = open_clip.create_model(f"local-dir:{tmp_path / 'clipself'}", pretrained_text=False)
    assert all(torch.equal(tensor, again.state_dict()[key]) for key, tensor in written.items())


def test_converted_eva_clip_model_embeds_as_eva_clip_does(eva_clip, tmp_path):
    """Image and text embeddings of the converted model = EVA-CLIP's forward on the original checkpoint: the
    renamed q/v biases, inner attention norm, SwiGLU (w1 gated by SiLU) and the dropped RoPE tables all fit."""
    clip, state = eva_clip
    checkpoint = tmp_path / "eva.pt"
    save_as_clipself_training(state, checkpoint)
    convert_checkpoint(checkpoint, tmp_path / "folder", EVA, peer="clipself")
    model = denserc.load(tmp_path / "folder").eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tokens = denserc.get_tokenizer(tmp_path / "folder")(["a photo of a cat", "a dog on grass"])
    with torch.no_grad():
        image_embedding = model.encode_image(images)
        text_embedding = model.encode_text(tokens)
        dense = model.encode_dense(images)
    assert torch.allclose(image_embedding, eva_clip_image_embedding(state, images, heads=4), atol=1e-5)
    assert torch.allclose(text_embedding, eva_clip_text_embedding(state, tokens, heads=4), atol=1e-5)
    assert dense.shape == (2, 32, 14, 14)


def test_plain_open_clip_checkpoint_module_prefixed_and_wrapped(tmp_path):
    torch.manual_seed(1)
    clip = randomize_(denserc.create_model("ViT-Tiny-16").clip, seed=7)
    state = {key: tensor.clone() for key, tensor in clip.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_1.pt")
    result = convert_checkpoint(tmp_path / "epoch_1.pt", tmp_path / "plain", "ViT-Tiny-16", peer="plain",
                                construction="multi-v", gating="qq", num_layers=2)

    written = load_file(tmp_path / "plain" / CLIP_WEIGHTS)
    assert written.keys() == state.keys() and result.dropped == []
    assert all(torch.equal(written[key], state[key]) for key in state)
    loaded = denserc.load(tmp_path / "plain")
    assert (loaded.construction, loaded.gating, loaded.num_layers, loaded.gate) == ("multi-v", "qq", 2, None)


def test_half_precision_legacy_format_checkpoint_widens_exactly(tmp_path):
    torch.manual_seed(1)
    clip = randomize_(denserc.create_model("ViT-Tiny-16").clip, seed=7)
    state = {key: tensor.half() for key, tensor in clip.state_dict().items()}
    torch.save({"model": state}, tmp_path / "half.pt", _use_new_zipfile_serialization=False)  # no mmap
    convert_checkpoint(tmp_path / "half.pt", tmp_path / "folder", "ViT-Tiny-16", construction="v")
    written = load_file(tmp_path / "folder" / CLIP_WEIGHTS)
    assert all(written[key].dtype == torch.float32 and torch.equal(written[key], state[key].float()) for key in state)


def test_safetensors_checkpoint(tmp_path):
    torch.manual_seed(1)
    clip = randomize_(denserc.create_model("ViT-Tiny-16").clip, seed=8)
    state = {key: tensor.clone() for key, tensor in clip.state_dict().items()}
    save_file(state, tmp_path / "open_clip_model.safetensors")
    convert_checkpoint(tmp_path / "open_clip_model.safetensors", tmp_path / "folder", "ViT-Tiny-16", construction="x+v")
    written = load_file(tmp_path / "folder" / CLIP_WEIGHTS)
    assert written.keys() == state.keys() and all(torch.equal(written[key], state[key]) for key in state)


def test_openai_release_under_a_gelu_name_is_refused(tmp_path):
    """As `create_model` refuses it: the hub's folder names the QuickGELU release of ViT-B-16."""
    release = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "open_clip_pytorch_model.bin"
    release.parent.mkdir()
    torch.save({"logit_scale": torch.ones(())}, release)
    with pytest.raises(ValueError, match="trained with QuickGELU"):
        convert_checkpoint(release, tmp_path / "out", "ViT-B-16", construction="x+v")


def test_the_error_names_missing_unexpected_and_misshapen_keys(eva_clip, tmp_path, capsys):
    _, state = eva_clip
    broken = {k: v for k, v in state.items() if not k.startswith("visual.blocks.3.mlp.")}
    broken["visual.extra_token"] = torch.zeros(3)
    broken["text.ln_final.weight"] = torch.zeros(7)
    save_as_clipself_training(broken, tmp_path / "broken.pt")
    assert main(["convert", str(tmp_path / "broken.pt"), str(tmp_path / "out"), "--model", EVA,
                 "--peer", "clipself"]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert "8 missing keys (visual.trunk.blocks.3.mlp.fc1_g.bias, visual.trunk.blocks.3.mlp.fc1_g.weight, " \
           "visual.trunk.blocks.3.mlp.fc1_x.bias, and 5 more)" in error
    assert "1 unexpected keys (visual.extra_token)" in error
    assert "1 keys of another shape (text.ln_final.weight (7,) (expected (64,)))" in error


def test_eva_checkpoint_of_another_grid_is_refused_not_resampled(eva_clip, tmp_path):
    _, state = eva_clip
    other = dict(state, **{"visual.pos_embed": torch.zeros(1, 1 + 16 * 16, 64)})
    save_as_clipself_training(other, tmp_path / "eva336.pt")
    with pytest.raises(ValueError, match=r"visual\.pos_embed has shape \(1, 257, 64\) but the model expects "
                                         r"\(1, 197, 64\)"):
        convert_checkpoint(tmp_path / "eva336.pt", tmp_path / "out", EVA, peer="clipself")


def test_eva_clip_checkpoint_needs_an_eva_model(eva_clip, tmp_path):
    _, state = eva_clip
    save_as_clipself_training(state, tmp_path / "eva.pt")
    with pytest.raises(ValueError, match="EVA-CLIP checkpoint converts to an open_clip EVA-02 model"):
        convert_checkpoint(tmp_path / "eva.pt", tmp_path / "out", "ViT-Tiny-16", peer="clipself")


def test_declip_records_its_content_stream(eva_clip, tmp_path):
    _, state = eva_clip
    save_as_clipself_training(state, tmp_path / "declip.pt")  # DeCLIP's training writes the same layout
    assert main(["convert", str(tmp_path / "declip.pt"), str(tmp_path / "out"), "--model", EVA,
                 "--peer", "declip"]) == 0
    assert denserc.load(tmp_path / "out").config == {"model_name": EVA, "construction": "v", "gating": "declip",
                                                      "num_layers": 1}


@pytest.mark.parametrize("options, message", [
    (["--peer", "clipself", "--construction", "v"], "--peer clipself sets construction x+v, gating none, "
                                                     "num layers 1 itself; drop --construction"),
    ([], "say which dense path the folder records"),
])
def test_dense_path_options(tmp_path, capsys, options, message):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--model", EVA, *options]) == 1
    assert message in capsys.readouterr().err


def test_non_empty_output_folder_and_unreadable_file_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        convert_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out", EVA, peer="clipself")
    with pytest.raises(ValueError, match="is not a checkpoint torch.load can read with weights_only=True"):
        read_checkpoint(tmp_path / "ckpt.pt")


def test_command_line_writes_the_folder(eva_clip, tmp_path, capsys):
    _, state = eva_clip
    state = dict(state)
    state["text.logit_scale"] = state.pop("logit_scale")  # where some EVA-CLIP releases keep it
    save_as_clipself_training(state, tmp_path / "epoch_6.pt")
    assert main(["convert", str(tmp_path / "epoch_6.pt"), str(tmp_path / "clipself"), "--model", EVA,
                 "--peer", "clipself"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'clipself'}: {EVA} from a EVA-CLIP checkpoint")
    assert "construction x+v, gating none, num_layers 1" in out
    loaded = denserc.load(tmp_path / "clipself")
    assert loaded.construction == "x+v" and torch.equal(loaded.clip.logit_scale, state["text.logit_scale"])


def test_python_api_refuses_a_gate_it_cannot_have_and_unknown_peers():
    with pytest.raises(ValueError, match="--gating hsg needs a trained Head Selection Gate"):
        dense_settings(None, "multi-v", "hsg", None)
    with pytest.raises(ValueError, match="unknown peer 'maskclip'"):
        dense_settings("maskclip", None, None, None)
    assert dense_settings("plain", "multi-v", None, 2) == {"construction": "multi-v", "gating": "none", "num_layers": 2}


def test_eval_region_runs_the_converted_clipself_model_on_its_dense_path(eva_clip, tmp_path):
    """`denserc eval region` on the folder evaluates CLIPSelf's x+v path, and its features are the folder's."""
    clip, state = eva_clip
    save_as_clipself_training(state, tmp_path / "epoch_6.pt")
    convert_checkpoint(tmp_path / "epoch_6.pt", tmp_path / "clipself", EVA, peer="clipself")
    ids = np.zeros((64, 96), np.int64)
    ids[:, :48], ids[:, 48:] = 1, 2
    label_map = np.where(ids == 1, 0, 80).astype(np.uint8)
    root = write_panoptic(tmp_path / "coco", [(grey_image(label_map, grey_levels([0, 80])), ids, {1: 0, 2: 80})])
    templates = write_templates(tmp_path / "templates.txt", "a photo of {article} {}.")
    out = tmp_path / "region.json"
    assert main(["eval", "region", "--model", str(tmp_path / "clipself"), "--data", str(root), "--image-size", "96",
                 "--templates", str(templates), "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    [result] = json.loads(out.read_text())["results"]
    assert result["config"] == {"model_name": EVA, "construction": "x+v", "gating": "none", "num_layers": 1}
    assert result["boxes"]["segments"] == 2

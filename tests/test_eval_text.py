"""Class-name lists, templates, prompt ensembling with synonyms, and the on-disk embedding cache."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

import denserc
from denserc.eval.text import (TextClassifier, build_text_classifier, builtin_class_names, load_class_names,
                               load_templates, render)
from helpers import TINY
from eval_fixtures import tiny_model, write_templates

EXPECTED_SIZES = {"ade20k": 150, "cityscapes": 19, "coco_panoptic": 133, "coco_stuff": 171, "context59": 59,
                  "context60": 60, "voc20": 20, "voc21": 21, "ade847": 847, "context459": 459, "voc20b": 59,
                  "catseg_coco_stuff": 171, "catseg_context59": 59, "catseg_voc20": 20}


def test_bundled_class_lists_have_the_standard_sizes_and_relations():
    assert builtin_class_names() == sorted(EXPECTED_SIZES)
    lists = {name: load_class_names(name) for name in EXPECTED_SIZES}
    assert {name: len(classes) for name, classes in lists.items()} == EXPECTED_SIZES
    for name, classes in lists.items():
        first_names = [synonyms[0] for synonyms in classes]
        if name == "ade847":  # WordNet senses share a first name ("screen, crt screen" / "screen, silver screen")
            first_names = [tuple(synonyms) for synonyms in classes]
        assert len(set(first_names)) == len(first_names), f"{name} repeats a class"
    assert lists["context60"][0] == ["background"] and lists["context60"][1:] == lists["context59"]
    assert lists["voc21"][1:] == lists["voc20"] and "sky" in lists["voc21"][0]
    assert lists["voc20"][14][:2] == ["person", "person in shirt"]
    # COCO panoptic and COCO-Stuff share the 80 thing classes in COCO's order
    assert lists["coco_panoptic"][:80] == lists["coco_stuff"][:80]
    assert (lists["coco_panoptic"][0], lists["coco_panoptic"][79], lists["coco_panoptic"][132]) == \
        (["person"], ["toothbrush"], ["rug"])


def test_template_sets():
    assert load_templates("openai") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(load_templates("openai")) == 80
    assert load_templates("simple") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    vild = load_templates("vild")
    assert len(vild) == 63
    assert render(vild[0], "apple") == "There is an apple in the scene."
    assert render(vild[2], "car") == "This is a photo of a car in the scene."


def test_class_and_template_file_errors(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=rf"{names}, line 2: empty class name"):
        load_class_names(names)
    names.write_text("cat, , kitten\n")
    with pytest.raises(ValueError, match="line 1: empty class name"):
        load_class_names(names)
    with pytest.raises(FileNotFoundError, match=r"'nonexistent' is neither a bundled one \(ade20k, "):
        load_class_names("nonexistent")
    bad = write_templates(tmp_path / "t.txt", "a photo of a {}.", "no placeholder here")
    with pytest.raises(ValueError, match=rf"{bad}, line 2: .*exactly once"):
        load_templates(bad)
    bad = write_templates(tmp_path / "t.txt", "a {kind} of {}.")
    with pytest.raises(ValueError, match="line 1: template 'a {kind} of {}.' is not a format string"):
        load_templates(bad)


def test_synonym_file_gives_one_query_per_name(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog, puppy , hound\n")
    assert load_class_names(names) == [["cat"], ["dog", "puppy", "hound"]]


def test_embeddings_are_normalised_template_averages_per_name():
    model, tokenizer = tiny_model(), denserc.get_tokenizer(TINY)
    templates = ["a photo of {article} {}.", "the {}!"]
    classifier = build_text_classifier(model, tokenizer, [["cat"], ["dog", "owl"]], templates)
    assert classifier.query_class.tolist() == [0, 1, 1]

    def ensemble(prompts):
        each = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        return F.normalize(each.mean(0), dim=-1)
    with torch.no_grad():
        expected = torch.stack([ensemble(["a photo of a cat.", "the cat!"]),
                                ensemble(["a photo of a dog.", "the dog!"]),
                                ensemble(["a photo of an owl.", "the owl!"])])
    torch.testing.assert_close(classifier.embeddings, expected)


def test_class_scores_take_the_best_synonym():
    classifier = TextClassifier([["a"], ["b", "b2"], ["c"]], torch.zeros(4, 2), torch.tensor([0, 1, 1, 2]))
    query_scores = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.4, 0.1, 0.6]])
    assert torch.equal(classifier.class_scores(query_scores), torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.4, 0.6]]))
    per_pixel = query_scores.T.reshape(4, 1, 2)  # (Q, H, W)
    assert torch.equal(classifier.class_scores(per_pixel, dim=0)[:, 0, 1], torch.tensor([0.5, 0.4, 0.6]))


def test_cache_is_reused_only_for_the_same_text_tower_names_and_templates(tmp_path):
    model, tokenizer = tiny_model(), denserc.get_tokenizer(TINY)
    names, templates = [["cat"], ["dog"]], ["a {}."]
    first = build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_text_encoding(*args, **kwargs):
        raise AssertionError("encode_text called although the embeddings are cached")
    real_encode_text = model.encode_text
    model.encode_text = no_text_encoding
    again = build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path)
    torch.testing.assert_close(again.embeddings, first.embeddings)
    for other_names, other_templates in (([["cat"], ["bird"]], templates), (names, ["the {}."])):
        with pytest.raises(AssertionError, match="encode_text called"):
            build_text_classifier(model, tokenizer, other_names, other_templates, cache_dir=tmp_path)
    model.encode_text = real_encode_text
    with torch.no_grad():
        model.clip.token_embedding.weight.add_(0.5)
    changed = build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path)
    assert not torch.allclose(changed.embeddings, first.embeddings)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # the image tower does not enter the key: DenseRC training leaves the text tower untouched
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    model.encode_text = no_text_encoding
    build_text_classifier(model, tokenizer, names, templates, cache_dir=tmp_path)


def test_unreadable_cache_file_is_named(tmp_path):
    model, tokenizer = tiny_model(), denserc.get_tokenizer(TINY)
    build_text_classifier(model, tokenizer, [["cat"]], ["a {}."], cache_dir=tmp_path)
    cache_file, = tmp_path.glob("*.safetensors")
    cache_file.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"cache file {cache_file} is unreadable .*delete it"):
        build_text_classifier(model, tokenizer, [["cat"]], ["a {}."], cache_dir=tmp_path)

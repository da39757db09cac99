"""Reference sets: shards or a folder -> images at the model's size, captions, labels; cached features."""
import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.eval.digits_classifier import DigitsNet
from difftrain.eval.extractors import DigitsExtractor
from difftrain.eval.reference import read_reference, reference_features, source_id


@pytest.fixture(scope="module")
def extractor():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DigitsExtractor(DigitsNet())  # untrained: the plumbing, not the quality


def test_shards_give_one_pass_with_captions_and_labels(digits):
    ref = read_reference(digits["val"], 1000, 16, 1)
    assert ref["images"].shape == (digits["num_val"], 16, 16, 1) and ref["images"].dtype == torch.uint8
    assert all(c == f"a handwritten digit {int(lab)}" for c, lab in zip(ref["captions"], ref["labels"]))
    few = read_reference(digits["val"], 7, 16, 1)
    assert torch.equal(few["images"], ref["images"][:7]) and few["captions"] == ref["captions"][:7]


def test_folder_with_txt_captions(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (20, 50), (33, 33)]):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a caption\n")
    ref = read_reference(str(tmp_path), 10, 24, 3)
    assert ref["images"].shape == (3, 24, 24, 3)
    assert ref["captions"] == ["", "a caption", ""] and ref["labels"].tolist() == [-1, -1, -1]


def test_features_are_cached_per_data_and_extractor(digits, extractor, tmp_path):
    a = reference_features(digits["val"], extractor, 50, 16, 1, cache_dir=tmp_path)
    files = list(tmp_path.glob("ref_*.safetensors"))
    assert len(files) == 1 and a["features"].shape == (50, 128)
    b = reference_features(digits["val"], extractor, 50, 16, 1, cache_dir=tmp_path)
    assert torch.equal(a["features"], b["features"]) and a["captions"] == b["captions"]
    assert torch.equal(a["labels"], b["labels"])
    reference_features(digits["val"], extractor, 40, 16, 1, cache_dir=tmp_path)  # another count: another entry
    assert len(list(tmp_path.glob("ref_*.safetensors"))) == 2


def test_source_id_follows_the_files(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    before = source_id(str(tmp_path))
    Image.new("L", (9, 9)).save(tmp_path / "a.png")
    assert source_id(str(tmp_path)) != before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_id(str(tmp_path / "{0..1}.tar"))

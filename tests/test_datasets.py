"""Dataset loaders read small fixtures they write; images decode lazily; collate pads with EOS."""

import io
import json

import pytest
import torch
from PIL import Image

from core_model.datasets import (
    CaptionDataset,
    CaptionRecord,
    DatasetError,
    collate,
    load_csv,
    load_folder,
    load_jsonl,
    load_karpathy,
    load_records,
)
from core_model.synthetic import SyntheticSplit
from core_model.tokenizer import CaptionTokenizer

VOCAB = 2048


def png(colour, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A stand-in preprocessor: (3, H, W) floats in [0, 1]."""
    return (
        torch.tensor(list(im.resize((8, 8)).tobytes()), dtype=torch.float32)
        .view(8, 8, 3)
        .permute(2, 0, 1)
        / 255
    )


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer(VOCAB)


@pytest.fixture
def karpathy(tmp_path):
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    images = []
    for k, split in enumerate(["train", "val", "test", "restval", "test"]):
        name = f"im{k}.png"
        (tmp_path / "imgs" / "val2014" / name).write_bytes(png((40 * k, 0, 0)))
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "imgid": k,
                "cocoid": 100 + k,
                "sentences": [{"raw": f"image {k} caption {j}.", "tokens": []} for j in range(2)],
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path, tmp_path / "imgs"


def test_karpathy_respects_split(karpathy, tok):
    path, root = karpathy
    train = load_karpathy(path, "train", image_root=root)
    test = load_karpathy(path, "test", image_root=root)
    val = load_karpathy(path, "val", image_root=root)
    assert [r.image_id for r in train] == ["100", "103"]  # restval trains, as in Karpathy's split
    assert [r.image_id for r in test] == ["102", "104"]
    assert [r.image_id for r in val] == ["101"]
    assert not {r.image_id for r in train} & {r.image_id for r in test}
    assert train[0].captions == ("image 0 caption 0.", "image 0 caption 1.")
    assert len(load_karpathy(path, None, image_root=root)) == 5
    ds = CaptionDataset(test, tok, to_tensor, max_tokens=16)
    assert len(ds) == 4  # one item per (image, reference)
    item = ds[3]
    assert item["caption"] == "image 4 caption 1." and item["image_index"] == 1
    assert item["input_ids"][-1] == tok.eos_id
    assert torch.allclose(item["pixels"][0], torch.full((8, 8), 160 / 255))  # im4 is red=160


def test_karpathy_flickr_layout_without_filepath(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png((1, 2, 3)))
    data = {
        "images": [{"filename": "a.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": "x"}]}]
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    recs = load_records(f"karpathy:{tmp_path / 'dataset_flickr30k.json'}", split="test")
    assert recs[0].image == str(tmp_path / "a.jpg")
    assert load_records(f"karpathy:{tmp_path / 'dataset_flickr30k.json'}", split="train") == []


def test_karpathy_bad_files_say_why(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_karpathy(bad)
    bad.write_text(json.dumps({"images": [{"filename": "x"}]}))
    with pytest.raises(DatasetError, match="lacks split"):
        load_karpathy(bad)


def test_jsonl_groups_references_and_respects_split(tmp_path, tok):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        (tmp_path / name).write_bytes(png(colour))
    lines = [
        {"image": "a.png", "caption": "a red thing", "split": "train"},
        {"image": "a.png", "caption": "something red", "split": "train"},
        {"image": "b.png", "captions": ["green", "a green thing"], "split": "train"},
        {"image": "c.png", "caption": "blue", "split": "test"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    train = load_jsonl(path, "train")
    assert [(r.image_id, r.captions) for r in train] == [
        ("a.png", ("a red thing", "something red")),
        ("b.png", ("green", "a green thing")),
    ]
    assert [r.image_id for r in load_jsonl(path, "test")] == ["c.png"]
    ds = CaptionDataset(train, tok, to_tensor, max_tokens=8)
    assert len(ds) == 4 and ds[2]["pixels"][1].mean() == 1.0  # b.png is green
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DatasetError, match="broken.jsonl:1"):
        load_jsonl(tmp_path / "broken.jsonl")


def test_splitless_sources_hold_out_a_stable_val_part(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"image": f"{i}.png", "caption": "c"}) + "\n" for i in range(400))
    )
    train = {r.image_id for r in load_jsonl(path, "train")}
    val = {r.image_id for r in load_jsonl(path, "val")}
    assert train and val and not train & val and len(train | val) == 400
    assert val == {r.image_id for r in load_jsonl(path, "val")}  # stable
    assert len(val) < 60


def test_csv(tmp_path):
    (tmp_path / "x.png").write_bytes(png((9, 9, 9)))
    path = tmp_path / "d.csv"
    path.write_text(
        'image,caption,split\nx.png,"a grey, square thing",train\nx.png,grey,train\ny.png,z,val\n'
    )
    recs = load_csv(path, "train")
    assert recs == [
        CaptionRecord(str(tmp_path / "x.png"), ("a grey, square thing", "grey"), "x.png")
    ]
    (tmp_path / "bad.csv").write_text("path,text\n")
    with pytest.raises(DatasetError, match="image"):
        load_csv(tmp_path / "bad.csv")


def test_folder_with_sidecars(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.jpg").write_bytes(png((200, 0, 0)))
    (tmp_path / "one.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "sub" / "two.png").write_bytes(png((0, 0, 200)))
    (tmp_path / "sub" / "two.txt").write_text("blue\n")
    (tmp_path / "lonely.png").write_bytes(png((0, 0, 0)))  # no sidecar: skipped
    recs = load_folder(tmp_path, split=None)
    assert [(r.image_id, r.captions) for r in recs] == [
        ("one.jpg", ("first caption", "second caption")),
        ("sub/two.png", ("blue",)),
    ]
    ds = CaptionDataset(recs, tok, to_tensor, max_tokens=8)
    assert len(ds) == 3 and ds[2]["pixels"][2].mean() == pytest.approx(200 / 255)
    with pytest.raises(DatasetError, match="not a folder"):
        load_folder(tmp_path / "nope")


def test_object_store_keys_are_read_lazily(tok):
    store = {"bucket/a.png": png((255, 255, 0)), "bucket/b.png": png((0, 255, 255))}
    reads = []

    def read_bytes(key: str) -> bytes:
        reads.append(key)
        return store[key]

    recs = [
        CaptionRecord("bucket/a.png", ("yellow",), "a"),
        CaptionRecord("bucket/b.png", ("cyan",), "b"),
    ]
    ds = CaptionDataset(recs, tok, to_tensor, max_tokens=8, read_bytes=read_bytes)
    assert reads == []  # nothing decoded at start-up
    item = ds[1]
    assert reads == ["bucket/b.png"] and item["pixels"][0].mean() == 0.0
    # (image, caption) tuples with raw bytes or PIL images work too
    ds2 = CaptionDataset(
        [(store["bucket/a.png"], "yellow"), (Image.new("L", (4, 4), 128), "grey")],
        tok,
        to_tensor,
        max_tokens=8,
    )
    assert ds2[0]["pixels"][2].mean() == 0.0 and ds2[1]["pixels"].shape == (3, 8, 8)


def test_collate_pads_with_eos_and_counts_lengths(tok):
    items = [
        {
            "input_ids": [5, 6, tok.eos_id],
            "image_index": 0,
            "caption": "x",
            "pixels": torch.zeros(3, 2, 2),
        },
        {
            "input_ids": [7, tok.eos_id],
            "image_index": 3,
            "caption": "y",
            "pixels": torch.ones(3, 2, 2),
        },
    ]
    b = collate(items, tok.eos_id)
    assert b["input_ids"].tolist() == [[5, 6, tok.eos_id], [7, tok.eos_id, tok.eos_id]]
    assert b["lengths"].tolist() == [3, 2]
    assert b["image_index"].tolist() == [0, 3]
    assert b["pixels"].shape == (2, 3, 2, 2)


def test_synthetic_source_and_max_tokens(tok):
    split = load_records("synthetic", "test", synthetic_sizes={"test": 7})
    assert isinstance(split, SyntheticSplit) and len(split) == 7
    ds = CaptionDataset(split, tok, to_tensor, max_tokens=5)
    assert len(ds) == 7
    ids = ds[0]["input_ids"]
    assert len(ids) == 5 and ids[-1] == tok.eos_id  # truncated, still ends with EOS
    with pytest.raises(DatasetError):
        load_records("synthetic", "nope")
    with pytest.raises(DatasetError):
        load_records("parquet:x.parquet")
    with pytest.raises(DatasetError):
        load_records("jsonl:")

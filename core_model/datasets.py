"""Captioned images for training and evaluation: records, loaders, a torch Dataset and collate.

A *record* is one image with one or more reference captions. Loaders read only metadata; the
image is decoded when an item is read, never at start-up. An image is a local path, an
object-store key (with a `read_bytes(key) -> bytes` callable), raw bytes or a PIL image.

    records = load_records("karpathy:data/dataset_coco.json", split="train", image_root="data/coco")
    ds = CaptionDataset(records, tokenizer, preprocess, max_tokens=32)
    loader = DataLoader(ds, batch_size=64, collate_fn=collate)

Sources (`load_records` spec):
    synthetic                  the project's shapes world (core_model.synthetic)
    karpathy:PATH              dataset_coco.json / dataset_flickr30k.json; its `split` field decides
                               (restval counts as train)
    jsonl:PATH / csv:PATH      rows of image, caption (and optionally split); several rows of one
                               image become one record with several references
    folder:PATH                images with a .txt sidecar of the same stem, one caption per line
Files without a split field give every record to "train" except a stable ~5% (by image name)
that forms "val" (and "test", the same records).
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .imageops import to_rgb

ImageRef = (
    str | Path | bytes | Image.Image
)  # path or object-store key, raw bytes, or a decoded image
ReadBytes = Callable[[str], bytes]  # object-store getter: key -> bytes
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif"}
VAL_PERCENT = 5  # share of a split-less source that becomes val/test


class DatasetError(Exception):
    """A dataset source that cannot be read, with a reason a person can act on."""


@dataclass(frozen=True)
class CaptionRecord:
    image: ImageRef  # where the pixels are
    captions: tuple[str, ...]  # one or more reference captions
    image_id: str  # stable name (file name, Karpathy imgid, ...)

    @property
    def caption(self) -> str:
        return self.captions[0]


# --------------------------------------------------------------------------------------------
# Image access
# --------------------------------------------------------------------------------------------


def load_image(ref: ImageRef, read_bytes: ReadBytes | None = None) -> Image.Image:
    """Decode `ref` to an RGB PIL image. Paths go through `read_bytes` when one is given."""
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
    elif read_bytes is not None:
        data = read_bytes(str(ref))
    else:
        data = Path(ref).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _stable_split(image_id: str) -> str:
    return "val" if zlib.crc32(image_id.encode()) % 100 < VAL_PERCENT else "train"


def _want(split_of_row: str | None, image_id: str, split: str | None) -> bool:
    if split is None:
        return True
    row = split_of_row or _stable_split(image_id)
    if row == "restval":
        row = "train"
    if not split_of_row and split == "test":
        return row == "val"  # split-less sources have one held-out part, used as val and test
    return row == split


def _resolve(path: str, root: Path | None) -> str:
    if root is None or "://" in path or Path(path).is_absolute():
        return path
    return str(root / path)


def load_karpathy(
    path: str | Path, split: str | None = "train", image_root: str | Path | None = None
) -> list[CaptionRecord]:
    """Karpathy-split JSON: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.

    Only images whose `split` is `split` are returned ("restval" counts as "train"); split=None
    returns every image. Image paths are image_root/filepath/filename.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected a Karpathy split file with an 'images' list")
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for k, img in enumerate(data["images"]):
        try:
            row_split = img["split"]
            name = img["filename"]
            captions = tuple(s["raw"].strip() for s in img["sentences"])
        except (KeyError, TypeError):
            raise DatasetError(
                f"{path}: image #{k} lacks split, filename or sentences[].raw"
            ) from None
        if split is not None and (row_split if row_split != "restval" else "train") != split:
            continue
        rel = f"{img['filepath']}/{name}" if img.get("filepath") else name
        image_id = str(img.get("cocoid", img.get("imgid", name)))
        out.append(CaptionRecord(_resolve(rel, root), captions, image_id))
    return out


def _group(
    rows: list[tuple[str, str, str | None]], split: str | None, root: Path | None
) -> list[CaptionRecord]:
    """(image, caption, split) rows -> records, one per image, references in file order."""
    caps: dict[str, list[str]] = {}
    row_split: dict[str, str | None] = {}
    for image, caption, sp in rows:
        caps.setdefault(image, []).append(caption)
        row_split.setdefault(image, sp)
    return [
        CaptionRecord(_resolve(image, root), tuple(c), image)
        for image, c in caps.items()
        if _want(row_split[image], image, split)
    ]


def load_jsonl(
    path: str | Path, split: str | None = "train", image_root: str | Path | None = None
) -> list[CaptionRecord]:
    """JSON lines of {"image": path-or-key, "caption": str | "captions": [str], "split"?: str}."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from None
        if (
            not isinstance(obj, dict)
            or "image" not in obj
            or not ("caption" in obj or "captions" in obj)
        ):
            raise DatasetError(
                f"{path}:{n}: expected an object with 'image' and 'caption' (or 'captions')"
            )
        captions = obj["captions"] if "captions" in obj else [obj["caption"]]
        for c in captions:
            rows.append((str(obj["image"]), str(c).strip(), obj.get("split")))
    root = Path(image_root) if image_root is not None else path.parent
    return _group(rows, split, root)


def load_csv(
    path: str | Path, split: str | None = "train", image_root: str | Path | None = None
) -> list[CaptionRecord]:
    """CSV with a header naming `image` and `caption` columns (and optionally `split`)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: the header must name 'image' and 'caption' columns")
            rows = [(r["image"], r["caption"].strip(), r.get("split") or None) for r in reader]
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    root = Path(image_root) if image_root is not None else path.parent
    return _group(rows, split, root)


def load_folder(path: str | Path, split: str | None = "train") -> list[CaptionRecord]:
    """Images in a folder (recursively), each with a .txt sidecar holding one caption per line."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder")
    rows = []
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = image.with_suffix(".txt")
        if not sidecar.exists():
            continue
        for line in sidecar.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append((str(image.relative_to(path)), line.strip(), None))
    return _group(rows, split, path)


def load_records(
    spec: str,
    split: str = "train",
    image_root: str | Path | None = None,
    synthetic_sizes: dict[str, int] | None = None,
    world=None,
) -> Sequence:
    """Records of `split` from a source spec (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        from .synthetic import SyntheticWorld

        sizes = {**SYNTHETIC_SIZES, **(synthetic_sizes or {})}
        if split not in sizes:
            raise DatasetError(f"synthetic data has no split {split!r}; known: {', '.join(sizes)}")
        return (world or SyntheticWorld()).split(split, sizes[split])
    if not arg:
        raise DatasetError(
            f"data spec {spec!r}: expected synthetic, karpathy:PATH, jsonl:PATH, csv:PATH or folder:PATH"
        )
    loaders = {"karpathy": load_karpathy, "jsonl": load_jsonl, "csv": load_csv}
    if kind in loaders:
        return loaders[kind](arg, split, image_root)
    if kind == "folder":
        return load_folder(arg, split)
    raise DatasetError(
        f"unknown data kind {kind!r}; expected synthetic, karpathy, jsonl, csv or folder"
    )


SYNTHETIC_SIZES = {"train": 100_000, "val": 500, "test": 1_000, "unseen": 1_000, "concept": 1_000}


# --------------------------------------------------------------------------------------------
# Dataset and collate
# --------------------------------------------------------------------------------------------


class CaptionDataset(Dataset):
    """One item per (image, reference caption) pair; pixels decoded when the item is read.

    Item: {"pixels": (3, H, W) float, "input_ids": list[int] ending in EOS, "image_index": int,
    "caption": str}. With `load_pixels=False` items skip the image (the trainer's feature cache).
    """

    def __init__(
        self,
        records: Sequence,  # CaptionRecord, SyntheticExample, or (image, caption) tuples
        tokenizer,  # CaptionTokenizer
        preprocess: Callable[[Image.Image], torch.Tensor],  # PIL -> (3, H, W)
        max_tokens: int,  # caption tokens kept, EOS included
        read_bytes: ReadBytes | None = None,  # object-store getter for string image refs
        all_captions: bool = True,  # one item per reference (False: first reference only)
    ):
        self.records = records
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_tokens = max_tokens
        self.read_bytes = read_bytes
        self.load_pixels = True
        if getattr(records, "single_caption", False) or not all_captions:
            self.pairs = None  # item i is record i, caption 0
        else:
            self.pairs = [(i, j) for i, r in enumerate(records) for j in range(len(_captions(r)))]

    def __len__(self) -> int:
        return len(self.records) if self.pairs is None else len(self.pairs)

    def image_index(self, i: int) -> int:
        return i if self.pairs is None else self.pairs[i][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r, j = (i, 0) if self.pairs is None else self.pairs[i]
        record = self.records[r]
        caption = _captions(record)[j]
        item = {
            "input_ids": self.tokenizer.encode_caption(caption, self.max_tokens),
            "image_index": r,
            "caption": caption,
        }
        if self.load_pixels:
            item["pixels"] = self.preprocess(self.image(r, record))
        return item

    def image(self, r: int, record: Any = None) -> Image.Image:
        record = self.records[r] if record is None else record
        return load_image(record[0] if isinstance(record, tuple) else record.image, self.read_bytes)


def _captions(record: Any) -> tuple[str, ...]:
    if isinstance(record, tuple):
        image, caption = record
        return (caption,) if isinstance(caption, str) else tuple(caption)
    return record.captions


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pad input_ids with `pad_id` (the tokenizer's EOS) and record lengths (EOS included).

    Returns {"input_ids": (B, T) long, "lengths": (B,) long, "image_index": (B,) long,
    "captions": list[str], "pixels": (B, 3, H, W) float when the items carry pixels}.
    """
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.long)
    ids = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, : len(it["input_ids"])] = torch.tensor(it["input_ids"], dtype=torch.long)
    batch = {
        "input_ids": ids,
        "lengths": lengths,
        "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
        "captions": [it["caption"] for it in items],
    }
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])
    return batch


class Collate:
    """Picklable collate_fn (DataLoader workers) bound to a pad id."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.pad_id)


def examples_to_records(examples: Sequence[tuple[Any, str]]) -> list[CaptionRecord]:
    """(image, caption) pairs (image: PIL, bytes or path/key) -> records, one per pair."""
    return [
        CaptionRecord(image, (caption,), f"example-{k}")
        for k, (image, caption) in enumerate(examples)
    ]

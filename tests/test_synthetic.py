"""The synthetic world: deterministic, lazily rendered, and its captions say what it drew."""

import re

import numpy as np
import pytest

from core_model.synthetic import (
    COLOURS,
    SIZES,
    SyntheticWorld,
    WorldConfig,
    nearest_colour,
    shape_mask,
)

PHRASE = r"a (small|large) (\w+) (\w+)"
TWO = re.compile(rf"^{PHRASE} (to the left of|above) {PHRASE}$")
ONE = re.compile(rf"^{PHRASE}$")
YS, XS = np.mgrid[0:64, 0:64].astype(np.float32)


def parse(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """Caption -> ([(size, colour, shape), ...], relation) by the world's grammar."""
    m = TWO.match(caption)
    if m:
        g = m.groups()
        rel = "left" if g[3] == "to the left of" else "above"
        return [g[0:3], g[4:7]], rel
    m = ONE.match(caption)
    assert m, f"caption outside the grammar: {caption!r}"
    return [m.groups()], ""


def patch_mean(pixels: np.ndarray, x: int, y: int) -> np.ndarray:
    return pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(0)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(WorldConfig(seed=3))


def test_same_seed_same_images_other_seed_other_images(world):
    again = SyntheticWorld(WorldConfig(seed=3))
    other = SyntheticWorld(WorldConfig(seed=4))
    for i in (0, 1, 17):
        a, b = world.split("train", 20)[i], again.split("train", 20)[i]
        assert a.caption == b.caption
        assert np.array_equal(a.pixels, b.pixels)
    assert any(
        not np.array_equal(world.split("train", 5)[i].pixels, other.split("train", 5)[i].pixels)
        for i in range(5)
    )
    # splits are different draws, and reading order does not matter
    assert not np.array_equal(world.split("train", 5)[0].pixels, world.split("test", 5)[0].pixels)
    late = world.split("val", 100)[42].pixels
    for i in range(5):
        world.split("val", 100)[i].pixels  # noqa: B018 - render others first
    assert np.array_equal(world.split("val", 100)[42].pixels, late)


def test_split_is_lazy_and_images_have_the_configured_size(world):
    huge = world.split("train", 10**9)  # nothing is built up front
    assert len(huge) == 10**9
    ex = huge[10**9 - 1]
    assert ex.image.size == (64, 64) and ex.image.mode == "RGB"
    with pytest.raises(IndexError):
        huge[10**9]


def test_captions_match_the_drawn_pixels(world):
    split = world.split("test", 60)
    for ex in split:
        objs, rel = parse(ex.caption)
        scene = ex.scene
        assert len(objs) == len(scene.objects) and rel == scene.relation
        px = ex.pixels
        for (size, colour, shape), obj in zip(objs, scene.objects, strict=True):
            assert (size, colour, shape) == (obj.size, obj.colour, obj.shape)
            # the colour under the object's body is the named colour
            x, y = obj.inside()
            assert nearest_colour(patch_mean(px, x, y), world.cfg.colours) == colour
            # the half-extent lies in the size word's range
            lo, hi = SIZES[size]
            assert lo * 64 <= obj.r <= hi * 64
            # shape: where the named shape and another shape of the same place and size differ,
            # the pixels are the object's colour exactly where the named shape covers them
            base = np.asarray(COLOURS[colour], float)
            mine = shape_mask(shape, XS, YS, obj.cx, obj.cy, obj.r)
            for other in ("circle", "square", "triangle", "diamond"):
                theirs = shape_mask(other, XS, YS, obj.cx, obj.cy, obj.r)
                for region, want in ((mine & ~theirs, True), (theirs & ~mine, False)):
                    if region.sum() >= 3:
                        is_object = np.abs(px[region].mean(0) - base).max() < 60
                        assert is_object == want, (ex.caption, obj, other)
        if rel:
            a, b = scene.objects
            if rel == "left":  # the first-named object is entirely left of the second
                assert a.cx + a.r < b.cx - b.r
            else:
                assert a.cy + a.r < b.cy - b.r


def test_shape_masks_differ():
    ys, xs = np.mgrid[0:32, 0:32].astype(np.float32)
    masks = {
        s: shape_mask(s, xs, ys, 16, 16, 10) for s in ("circle", "square", "triangle", "diamond")
    }
    assert masks["square"].sum() > masks["circle"].sum() > masks["triangle"].sum()
    assert masks["triangle"][25, 16] and not masks["triangle"][7, 10]  # apex up, base down


def test_held_out_concept_and_unseen_pairs_never_in_training(world):
    cfg = world.cfg
    assert "purple" in cfg.held_out_concepts
    for name in ("train", "val", "test"):
        for ex in world.split(name, 400):
            objs, _ = parse(ex.caption)
            for _, colour, shape in objs:
                assert colour != "purple"
                assert (colour, shape) not in cfg.unseen_pairs
    for ex in world.split("unseen", 100):
        objs, _ = parse(ex.caption)
        assert any((c, s) in cfg.unseen_pairs for _, c, s in objs)
        assert all(c != "purple" for _, c, _ in objs)
    for ex in world.split("concept", 100):  # the held-out concept, produced on demand
        assert "purple" in ex.caption


def test_vocabulary_is_configurable():
    w = SyntheticWorld(
        WorldConfig(
            colours=("red", "blue", "orange"),
            shapes=("circle", "diamond"),
            held_out_concepts=("diamond",),
            unseen_pairs=(),
        )
    )
    captions = [ex.caption for ex in w.split("train", 200)]
    assert all("diamond" not in c and "green" not in c for c in captions)
    assert any("orange" in c for c in captions)
    assert all("diamond" in ex.caption for ex in w.split("concept", 20))
    with pytest.raises(ValueError):
        w.split("unseen", 10)  # no unseen pairs configured
    with pytest.raises(ValueError):
        WorldConfig(colours=("red",), held_out_concepts=("red",))
    with pytest.raises(ValueError):
        WorldConfig(colours=("magenta",))


def test_three_objects_option():
    w = SyntheticWorld(WorldConfig(count_weights=(0.0, 0.0, 1.0)))
    for ex in w.split("train", 30):
        assert len(ex.scene.objects) == 3
        assert ex.caption.endswith(("from left to right", "from top to bottom"))
        a, b, c = ex.scene.objects
        key = (lambda o: o.cx) if ex.scene.relation == "left" else (lambda o: o.cy)
        assert key(a) < key(b) < key(c)

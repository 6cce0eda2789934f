"""A synthetic captioning world whose truth is known: coloured shapes on noisy backgrounds.

Every image is rendered on demand from (seed, split, index), so a split of 50,000 images costs
nothing until an item is read, and the same item is the same pixels on every machine:

    world = SyntheticWorld(WorldConfig(seed=0))
    train = world.split("train", 50_000)     # a lazy Sequence of SyntheticExample
    ex = train[7]                            # scene sampled now; pixels rendered on .image
    ex.caption  -> "a small red circle to the left of a large blue square"
    ex.image    -> PIL RGB image, config.image_size square

Captions are a function of the picture, so exact-match is a fair metric: with two objects the
first one named is the left one ("to the left of") or the upper one ("above"), never the other
way round. Splits:

    train / val / test   the training distribution (held-out concepts and unseen pairs excluded)
    unseen               every image holds a colour-shape pair that no training image holds
    concept              every image holds a held-out concept (e.g. "purple"), to be taught later
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

# Base RGB of each colour word. Objects jitter around these; backgrounds are kept unsaturated,
# so a colour word never describes the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 45),
    "purple": (145, 55, 195),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Half-extent of an object as a fraction of the image side, per size word. The gap between the
# ranges keeps "small" and "large" unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.16, 0.20)}
SPLITS = ("train", "val", "test", "unseen", "concept")


@dataclass(frozen=True)
class WorldConfig:
    """What the world may contain. Two worlds with equal configs render identical images."""

    seed: int = 0  # every image is a pure function of (seed, split, index)
    image_size: int = 64  # side of the square image in pixels
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")  # subset of COLOURS
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # subset of SHAPES
    count_weights: tuple[float, ...] = (0.3, 0.7)  # P(1 object), P(2 objects)[, P(3 objects)]
    held_out_concepts: tuple[str, ...] = (
        "purple",
    )  # colour/shape words absent from train/val/test/unseen
    unseen_pairs: tuple[tuple[str, str], ...] = (
        ("green", "triangle"),
        ("blue", "circle"),
    )  # (colour, shape)
    colour_jitter: int = 20  # +- per channel around an object's base colour
    noise: float = 8.0  # std of Gaussian pixel noise over the whole image
    min_gap: float = 0.05  # smallest empty gap between two objects, fraction of the side

    def __post_init__(self) -> None:
        bad = [c for c in self.colours if c not in COLOURS] + [
            s for s in self.shapes if s not in SHAPES
        ]
        if bad:
            raise ValueError(f"unknown colours/shapes {bad}; known: {sorted(COLOURS)} and {SHAPES}")
        if not 1 <= len(self.count_weights) <= 3 or sum(self.count_weights) <= 0:
            raise ValueError("count_weights gives P(1), P(2) and optionally P(3) objects")
        words = set(self.colours) | set(self.shapes)
        unknown = [c for c in self.held_out_concepts if c not in words]
        if unknown:
            raise ValueError(f"held-out concepts {unknown} are not colours or shapes of this world")
        for colour, shape in self.unseen_pairs:
            if colour not in self.train_colours or shape not in self.train_shapes:
                raise ValueError(
                    f"unseen pair ({colour}, {shape}) is not in this world or is held out"
                )
        if not self.train_colours or not self.train_shapes:
            raise ValueError("holding out every colour or every shape leaves nothing to train on")

    @property
    def train_colours(self) -> tuple[str, ...]:
        return tuple(c for c in self.colours if c not in self.held_out_concepts)

    @property
    def train_shapes(self) -> tuple[str, ...]:
        return tuple(s for s in self.shapes if s not in self.held_out_concepts)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top
    r: float  # half-extent in pixels

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def inside(self) -> tuple[int, int]:
        """A pixel (x, y) well inside the drawn shape (for checking colours)."""
        dy = self.r / 3 if self.shape == "triangle" else 0.0  # a triangle's body is its lower part
        return int(round(self.cx)), int(round(self.cy + dy))


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in caption order
    relation: str  # "" (one object) | "left" | "above"
    background: tuple  # (kind, colour_a, colour_b) for the renderer

    @property
    def caption(self) -> str:
        phrases = [o.phrase for o in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        if len(phrases) == 2:
            rel = "to the left of" if self.relation == "left" else "above"
            return f"{phrases[0]} {rel} {phrases[1]}"
        order = "from left to right" if self.relation == "left" else "from top to bottom"
        return f"{phrases[0]}, {phrases[1]} and {phrases[2]} {order}"

    @property
    def words(self) -> set[str]:
        return {w for o in self.objects for w in (o.colour, o.shape, o.size)}


class SyntheticExample:
    """One captioned image. The scene is known at once; pixels are rendered on first access."""

    def __init__(self, world: SyntheticWorld, scene: Scene, key: tuple[int, int, int]):
        self.world = world
        self.scene = scene
        self.key = key  # (seed, split code, index)

    @property
    def caption(self) -> str:
        return self.scene.caption

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.scene.caption,)

    @property
    def image_id(self) -> str:
        return "synthetic-{}-{}-{}".format(*self.key)

    @cached_property
    def pixels(self) -> np.ndarray:
        return self.world.render(self.scene, self.key)  # (H, W, 3) uint8

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="RGB")

    def __repr__(self) -> str:
        return f"SyntheticExample({self.image_id}, {self.caption!r})"


class SyntheticSplit(Sequence):
    """A lazy, indexable split: item i is built from (seed, split, i) when read."""

    single_caption = True  # one reference per item (lets datasets skip scanning the captions)

    def __init__(self, world: SyntheticWorld, name: str, size: int):
        self.world, self.name, self.size = world, name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.size))]
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.world.example(self.name, i)


def _split_code(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across runs (unlike hash())


class SyntheticWorld:
    def __init__(self, config: WorldConfig | None = None):
        self.cfg = config or WorldConfig()
        S = self.cfg.image_size
        self._grid = np.mgrid[0:S, 0:S].astype(
            np.float32
        )  # (2, S, S): row and column of each pixel

    # --- splits -----------------------------------------------------------------------------

    def split(self, name: str, size: int) -> SyntheticSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        if name == "unseen" and not self.cfg.unseen_pairs:
            raise ValueError(
                "this world holds out no colour-shape pairs, so it has no 'unseen' split"
            )
        if name == "concept" and not self.cfg.held_out_concepts:
            raise ValueError("this world holds out no concept, so it has no 'concept' split")
        return SyntheticSplit(self, name, size)

    def example(self, split: str, index: int) -> SyntheticExample:
        key = (self.cfg.seed, _split_code(split), index)
        rng = np.random.default_rng(key)
        return SyntheticExample(self, self.sample_scene(rng, split), key)

    # --- scene sampling ---------------------------------------------------------------------

    def _allowed(self, rng: np.random.Generator, split: str, n: int) -> list[tuple[str, str, str]]:
        """(colour, shape, size) for n objects, obeying the split's rules."""
        cfg = self.cfg
        held = set(cfg.held_out_concepts)
        unseen = set(cfg.unseen_pairs)
        colours = [c for c in cfg.colours if c not in held]
        shapes = [s for s in cfg.shapes if s not in held]
        sizes = list(SIZES)
        special = rng.integers(n)  # which object carries the split's required concept
        out = []
        for k in range(n):
            if split == "unseen" and k == special:
                colour, shape = cfg.unseen_pairs[rng.integers(len(cfg.unseen_pairs))]
            elif split == "concept" and k == special:
                concept = cfg.held_out_concepts[rng.integers(len(cfg.held_out_concepts))]
                if concept in cfg.colours:
                    colour, shape = concept, shapes[rng.integers(len(shapes))]
                else:
                    colour, shape = colours[rng.integers(len(colours))], concept
            else:
                while True:  # no other object may hold an unseen pair (keeps train clean)
                    colour = colours[rng.integers(len(colours))]
                    shape = shapes[rng.integers(len(shapes))]
                    if (colour, shape) not in unseen:
                        break
            out.append((colour, shape, sizes[rng.integers(len(sizes))]))
        return out

    def sample_scene(self, rng: np.random.Generator, split: str) -> Scene:
        cfg = self.cfg
        S = cfg.image_size
        w = np.asarray(cfg.count_weights, dtype=float)
        n = int(rng.choice(len(w), p=w / w.sum())) + 1
        gap = cfg.min_gap * S
        while True:  # sizes that cannot fit side by side even at their smallest are drawn again
            attrs = self._allowed(rng, split, n)
            smallest = sum(2 * SIZES[size][0] * S for _, _, size in attrs) + (n - 1) * gap
            if n == 1 or smallest < S - 4:
                break
        relation = "" if n == 1 else ("left" if rng.random() < 0.5 else "above")
        while True:  # rejection sampling of sizes and positions until the layout is unambiguous
            radii = [rng.uniform(*SIZES[size]) * S for _, _, size in attrs]
            if n > 1 and sum(2 * r for r in radii) + (n - 1) * gap > S - 2:
                continue  # too big to fit side by side: draw sizes again
            layout = self._layout(rng, radii, relation, gap)
            if layout is not None:
                break
        objects = tuple(
            SceneObject(colour=c, shape=s, size=z, cx=x, cy=y, r=r)
            for (c, s, z), (x, y), r in zip(attrs, layout, radii, strict=True)
        )
        return Scene(objects=objects, relation=relation, background=self._background(rng))

    def _layout(self, rng, radii, relation, gap) -> list[tuple[float, float]] | None:
        """Centres for objects of half-extent `radii`, placed along the relation's axis in
        caption order; None when this draw is ambiguous (objects not clearly along the axis)."""
        S = self.cfg.image_size
        n = len(radii)
        if n == 1:
            r = radii[0]
            return [(rng.uniform(r + 1, S - 1 - r), rng.uniform(r + 1, S - 1 - r))]
        # main axis: spread the free space at random between the margins and the gaps
        free = S - 2 - sum(2 * r for r in radii) - (n - 1) * gap
        cuts = np.sort(rng.uniform(0, free, size=n))
        pos, main = 1.0, []
        prev = 0.0
        for k, r in enumerate(radii):
            pos += cuts[k] - prev + (gap if k else 0.0)
            prev = cuts[k]
            main.append(pos + r)
            pos += 2 * r
        # cross axis: anywhere it fits, but the offset between neighbours must stay under half
        # their distance along the main axis, so "left of" never also reads as "above"
        cross = [rng.uniform(r + 1, S - 1 - r) for r in radii]
        for k in range(1, n):
            if abs(cross[k] - cross[k - 1]) > 0.5 * (main[k] - main[k - 1]):
                return None
        if relation == "left":
            return list(zip(main, cross, strict=True))
        return list(zip(cross, main, strict=True))

    def _background(self, rng: np.random.Generator) -> tuple:
        """An unsaturated background: flat, a gradient, or low-contrast stripes."""
        kind = ("flat", "hgrad", "vgrad", "dgrad", "stripes")[rng.integers(5)]

        def muted() -> tuple[int, int, int]:
            grey = rng.uniform(25, 215)
            return tuple(int(np.clip(grey + rng.uniform(-18, 18), 0, 255)) for _ in range(3))

        return (kind, muted(), muted(), float(rng.uniform(3, 9)))  # last: stripe period in px

    # --- rendering ----------------------------------------------------------------------------

    def render(self, scene: Scene, key: tuple[int, int, int]) -> np.ndarray:
        """Scene -> (S, S, 3) uint8 pixels, deterministic in `key`."""
        cfg = self.cfg
        S = cfg.image_size
        rng = np.random.default_rng(key + (1,))  # a stream separate from the scene sampler
        ys, xs = self._grid  # (S, S) each
        kind, a, b, period = scene.background
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if kind == "flat":
            t = np.zeros((S, S), np.float32)
        elif kind == "hgrad":
            t = xs / (S - 1)
        elif kind == "vgrad":
            t = ys / (S - 1)
        elif kind == "dgrad":
            t = (xs + ys) / (2 * (S - 1))
        else:  # stripes
            t = ((xs + ys) // period % 2).astype(np.float32) * 0.35
        img = a + t[..., None] * (b - a)  # (S, S, 3) float
        for obj in scene.objects:
            base = np.asarray(COLOURS[obj.colour], np.float32)
            colour = np.clip(base + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3), 0, 255)
            img[shape_mask(obj.shape, xs, ys, obj.cx, obj.cy, obj.r)] = colour
        img += cfg.noise * rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def shape_mask(
    shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float
) -> np.ndarray:
    """Boolean (S, S) mask of `shape` centred at (cx, cy) with half-extent r (pixel centres)."""
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":  # the full half-extent: its corners are what tell it from a circle
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at the bottom
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.1)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    raise ValueError(f"unknown shape {shape!r}")


def nearest_colour(rgb: Sequence[float], colours: Sequence[str] = tuple(COLOURS)) -> str:
    """The colour word whose base RGB is closest to `rgb`."""
    v = np.asarray(rgb, np.float32)
    return min(colours, key=lambda c: float(np.sum((np.asarray(COLOURS[c], np.float32) - v) ** 2)))


def world_config_from_dict(d: dict) -> WorldConfig:
    """Inverse of dataclasses.asdict(WorldConfig) after a JSON round trip (lists -> tuples)."""
    fixed = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in d.items()
    }
    return WorldConfig(**fixed)

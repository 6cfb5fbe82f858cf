"""The embedded synthetic default data: coloured shapes on a 3x3 grid, with captions and referring phrases.

Every image is generated on the fly from (seed, split, index), so the default config trains with no files.
Objects sit in distinct grid cells (with jitter), which keeps them apart at 64x64 and makes "left of",
"above" and "in the top left" exact. A scene's layout (attributes + cells) is assigned to exactly one split
by a stable hash, so no caption+layout of one split appears in another.
"""

import itertools
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vlp.datamodules.source import DataSource
from vlp.datamodules.tokenizer import build_wordpiece_tokenizer, load_tokenizer

SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_SYNONYMS = {"circle": "disc", "square": "box", "triangle": "triangle", "cross": "plus"}
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 230),
    "white": (240, 240, 240),
}
BACKGROUND = (30, 30, 30)
SIZES = {"small": 0.55, "large": 0.9}  # object extent as a fraction of the usable cell width
SIZE_SYNONYMS = {"small": "little", "large": "big"}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
SPLITS = ("train", "val", "test")
GRID = 3
MIN_IMAGE_SIZE = 32
SINGLE_OBJECT_PROBABILITY = 0.02
TOKEN_CACHE_SIZE = 200_000  # distinct texts whose ids a source keeps (a few tens of MB)
# scenes (with their references and unambiguous phrases) a dataset keeps: a few KB each. An epoch after the
# first then skips the layout sampling and the ambiguity checks, most of an item's time
# (benchmarks/results/2026-12-02-epyc-2cpu-make-train.md).
SCENE_CACHE_SIZE = 50_000
# first object (earlier in reading order) relative to the second, keyed by (same row, column order)
RELATIONS = {
    (True, 1): ("left of", "right of"),
    (False, 0): ("above", "below"),
    (False, 1): ("above and left of", "below and right of"),
    (False, -1): ("above and right of", "below and left of"),
}
RELATION_SYNONYMS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "over",
    "below": "under",
}
QUESTION_WORDS = ("what", "colour", "how", "many", "shapes", "are", "where", "?")  # see shapes_questions.py
GRAMMAR_WORDS = tuple(
    dict.fromkeys(
        "a there is in at the and of to left right above below over under top middle bottom center shape".split()
        + [*SIZES, *SIZE_SYNONYMS.values(), *COLOURS, *SHAPES, *SHAPE_SYNONYMS.values(), *QUESTION_WORDS]
    )
)
# referring-phrase kinds, from least to most specific: the attributes each one names
PHRASE_KINDS = (
    ("shape",),
    ("colour",),
    ("size",),
    ("colour", "shape"),
    ("size", "colour", "shape"),
    ("cell",),
    ("colour", "shape", "cell"),
)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: attributes, grid cell, half-open pixel bounds and the normalised (cx, cy, w, h) box."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    pixels: tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive
    box: tuple[float, float, float, float]

    @property
    def position(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"

    def describe(self, synonyms: bool = False) -> str:
        if synonyms:
            return f"a {SIZE_SYNONYMS[self.size]} {self.colour} {SHAPE_SYNONYMS[self.shape]}"
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Phrase:
    """A referring phrase for `objects[object_index]`; ambiguous when it also fits another object."""

    text: str
    object_index: int
    ambiguous: bool


@dataclass(frozen=True)
class Scene:
    """A generated image's content: its objects in reading order (row, then column)."""

    image_size: int
    objects: tuple[SceneObject, ...]

    def references(self) -> list[str]:
        """Five distinct paraphrases; index 0 is the canonical caption."""
        first, rest = self.objects[0], self.objects[1:]
        if not rest:
            where = f"in the {first.position}"
            return [
                f"{first.describe()} {where}",
                f"{first.describe(True)} at the {first.position}",
                f"{where} there is {first.describe()}",
                f"{where} there is {first.describe(True)}",
                f"there is {first.describe()} {where}",
            ]
        second, others = rest[0], rest[1:]
        relation, inverse = RELATIONS[(first.row == second.row, int(np.sign(second.col - first.col)))]

        def tail(synonyms: bool) -> str:
            prep = "at" if synonyms else "in"
            return "".join(f" and {o.describe(synonyms)} {prep} the {o.position}" for o in others)

        def synonym(rel: str) -> str:
            return " and ".join(RELATION_SYNONYMS[part] for part in rel.split(" and "))

        # the second-mentioned object also gets its cell, so two-object captions rarely repeat
        return [
            f"{first.describe()} {relation} {second.describe()} in the {second.position}{tail(False)}",
            f"{first.describe(True)} {synonym(relation)} {second.describe(True)} at the {second.position}{tail(True)}",
            f"{second.describe()} {inverse} {first.describe()} in the {first.position}{tail(False)}",
            f"{second.describe(True)} {synonym(inverse)} {first.describe(True)} at the {first.position}{tail(True)}",
            " and ".join(f"{o.describe()} in the {o.position}" for o in self.objects),
        ]

    def phrase(self, index: int, kind: tuple[str, ...]) -> Phrase:
        """The phrase naming `objects[index]` by the attributes of `kind` (see PHRASE_KINDS)."""
        target = self.objects[index]
        matches = sum(all(_attribute(o, a) == _attribute(target, a) for a in kind) for o in self.objects)
        return Phrase(_phrase_text(target, kind), index, matches > 1)

    def phrases(self) -> list[Phrase]:
        """Every candidate referring phrase of every object, with its ambiguity in this scene."""
        return [self.phrase(index, kind) for index in range(len(self.objects)) for kind in PHRASE_KINDS]

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            _draw_shape(draw, o)
        return image


def _attribute(obj: SceneObject, name: str) -> object:
    return (obj.row, obj.col) if name == "cell" else getattr(obj, name)


def _phrase_text(obj: SceneObject, kind: tuple[str, ...]) -> str:
    words = [obj.size if "size" in kind else "", obj.colour if "colour" in kind else ""]
    words.append(obj.shape if "shape" in kind else "shape")
    text = "the " + " ".join(w for w in words if w)
    return f"{text} in the {obj.position}" if "cell" in kind else text


def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    x0, y0, x1, y1 = o.pixels
    colour = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif o.shape == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=colour)
    else:  # cross: two bars one third of the extent thick
        extent = x1 - x0
        thick = max(1, round(extent / 3))
        offset = (extent - thick) // 2
        draw.rectangle((x0, y0 + offset, x1 - 1, y0 + offset + thick - 1), fill=colour)
        draw.rectangle((x0 + offset, y0, x0 + offset + thick - 1, y1 - 1), fill=colour)


def generate_scene(rng: random.Random, image_size: int, max_objects: int) -> Scene:
    """Draw 1..max_objects objects into distinct grid cells with random attributes and jitter."""
    multi = max_objects > 1 and rng.random() >= SINGLE_OBJECT_PROBABILITY
    count = rng.randint(2, max_objects) if multi else 1
    bounds = [image_size * i // GRID for i in range(GRID + 1)]
    usable = min(b - a for a, b in itertools.pairwise(bounds)) - 2  # 1 px margin on each side
    objects = []
    for cell in sorted(rng.sample(range(GRID * GRID), count)):
        row, col = divmod(cell, GRID)
        shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
        extent = round(SIZES[size] * usable)
        x0 = bounds[col] + 1 + rng.randint(0, bounds[col + 1] - bounds[col] - 2 - extent)
        y0 = bounds[row] + 1 + rng.randint(0, bounds[row + 1] - bounds[row] - 2 - extent)
        side = extent / image_size
        box = ((x0 + extent / 2) / image_size, (y0 + extent / 2) / image_size, side, side)
        objects.append(SceneObject(shape, colour, size, row, col, (x0, y0, x0 + extent, y0 + extent), box))
    return Scene(image_size, tuple(objects))


def layout_key(scene: Scene) -> str:
    """What identifies a scene up to jitter: each object's attributes and cell."""
    return ";".join(f"{o.size} {o.colour} {o.shape} {o.row}{o.col}" for o in scene.objects)


class ShapesDataset(Dataset):
    """One split of the shapes data; items are dicts (see `ShapesSource`). Train varies text by epoch."""

    def __init__(self, split: str, length: int, image_size: int, max_objects: int, seed: int) -> None:
        self.split = split
        self.length = length
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed
        self.epoch = 0
        self._scenes: dict[int, tuple[Scene, list[str], list[Phrase]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Pick other references/phrases on train for this epoch (val/test are fixed)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """Resample until the layout hashes to this split, which makes the splits disjoint by construction."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for the {self.split} split of length {self.length}")
        split_id = SPLITS.index(self.split)
        for attempt in range(1000):
            rng = random.Random(f"shapes:{self.seed}:{self.split}:{index}:{attempt}")
            scene = generate_scene(rng, self.image_size, self.max_objects)
            if zlib.crc32(f"{self.seed}|{layout_key(scene)}".encode()) % len(SPLITS) == split_id:
                return scene
        raise RuntimeError(f"no {self.split} layout found for index {index}")  # probability (2/3)^1000

    def _scene_texts(self, index: int) -> tuple[Scene, list[str], list[Phrase]]:
        """The scene of `index`, its references and its unambiguous phrases (the same every epoch), cached."""
        cached = self._scenes.get(index)
        if cached is None:
            scene = self.scene(index)
            cached = (scene, scene.references(), [p for p in scene.phrases() if not p.ambiguous])
            if len(self._scenes) >= SCENE_CACHE_SIZE:
                self._scenes.clear()
            self._scenes[index] = cached
        return cached

    def __getitem__(self, index: int) -> dict:
        scene, references, usable = self._scene_texts(index)
        if self.split == "train":
            rng = random.Random(f"text:{self.seed}:{index}:{self.epoch}")
            caption = references[rng.randrange(len(references))]
        else:
            rng = random.Random(f"text:{self.seed}:{self.split}:{index}")
            caption = references[0]
        phrase = usable[rng.randrange(len(usable))]
        pixels = torch.from_numpy(np.array(scene.render())).permute(2, 0, 1)
        return {
            "image": pixels.float().div_(127.5).sub_(1.0),
            "image_id": index,
            "caption": caption,
            "references": list(references),  # a copy: the cached list stays as it is
            "phrase": phrase.text,
            "box": torch.tensor(scene.objects[phrase.object_index].box, dtype=torch.float32),
        }


class ShapesSource(DataSource):
    """The embedded synthetic default: images + captions + referring phrases, generated on the fly.

    Items: `image` [3, H, W] in [-1, 1], `image_id`, `caption`, `references` (5, index 0 canonical), `phrase`
    (unambiguous) and its object's `box` (cx, cy, w, h) in [0, 1]. `tokenizer` None builds a WordPiece over
    the grammar's words; otherwise it is a local tokenizer directory.
    """

    def __init__(
        self,
        image_size: int = 64,
        max_objects: int = 3,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 500,
        max_text_len: int = 40,
        tokenizer: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be >= {MIN_IMAGE_SIZE} for a {GRID}x{GRID} grid, got {image_size}"
            )
        if not 1 <= max_objects <= GRID * GRID:
            raise ValueError(
                f"max_objects must be in [1, {GRID * GRID}] (one per grid cell), got {max_objects}"
            )
        for name, value, low in [
            ("num_train", num_train, 1),
            ("num_val", num_val, 1),
            ("num_test", num_test, 1),
            ("max_text_len", max_text_len, 3),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ]:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.image_size, self.max_objects, self.seed = image_size, max_objects, seed
        self.lengths = {"train": num_train, "val": num_val, "test": num_test}
        self.max_text_len, self.batch_size, self.num_workers = max_text_len, batch_size, num_workers
        self.tokenizer: PreTrainedTokenizerBase = (
            build_wordpiece_tokenizer(GRAMMAR_WORDS) if tokenizer is None else load_tokenizer(tokenizer)
        )
        self._token_ids: dict[str, list[int]] = {}  # text -> ids, see _tokenize

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def dataset(self, split: str) -> ShapesDataset:
        self._check_split(split)
        return ShapesDataset(split, self.lengths[split], self.image_size, self.max_objects, self.seed)

    def describe(self, split: str, index: int) -> Scene:
        return self.dataset(split).scene(index)

    def dataloader(self, split: str) -> DataLoader:
        """Batches of `collate`; train is shuffled with a seeded generator."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids and mask, right-padded to the longest, truncated at `max_text_len`: what the tokenizer's
        batch call gives, with each distinct text encoded once (the grammar repeats texts across steps)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_ids))
        if missing:
            if len(self._token_ids) + len(missing) > TOKEN_CACHE_SIZE:
                self._token_ids.clear()
            encoded = self.tokenizer(missing, truncation=True, max_length=self.max_text_len)["input_ids"]
            self._token_ids.update(zip(missing, encoded, strict=True))
        rows = [self._token_ids[t] for t in texts]
        longest, pad = max(map(len, rows)), self.tokenizer.pad_token_id
        # one tensor from padded lists: a torch.tensor per row cost more than the rest of the collate
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in rows], dtype=torch.long)
        lengths = torch.tensor([len(ids) for ids in rows])
        attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        return input_ids, attention_mask

    def collate(self, items: list[dict]) -> dict:
        """Stack images [B, 3, H, W] and boxes [B, 4]; tokenize captions [B, L] and phrases [B, Lp]."""
        input_ids, attention_mask = self._tokenize([item["caption"] for item in items])
        phrase_ids, phrase_mask = self._tokenize([item["phrase"] for item in items])
        return {
            "image": torch.stack([item["image"] for item in items]),
            "image_id": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "phrase_input_ids": phrase_ids,
            "phrase_attention_mask": phrase_mask,
            "boxes": torch.stack([item["box"] for item in items]),
            "captions": [item["caption"] for item in items],
            "references": [item["references"] for item in items],
            "phrases": [item["phrase"] for item in items],
        }


CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


class ShapeClassesDataset(ShapesDataset):
    """Single-object scenes with their class index (`label`) among `CLASS_NAMES`."""

    def __getitem__(self, index: int) -> dict:
        obj = self.scene(index).objects[0]
        return {**super().__getitem__(index), "label": CLASS_NAMES.index(f"{obj.colour} {obj.shape}")}


class ShapeClassesSource(ShapesSource):
    """Labelled single-object shapes for zero-shot classification: one class per colour + shape
    ("red circle": 24 classes), any size and cell. Batches add `label` [B] and `class_names`; the caption
    keys hold the object's description, as every source provides them."""

    def __init__(self, **kwargs) -> None:
        """The arguments of `ShapesSource`, with one object per image."""
        super().__init__(max_objects=1, **kwargs)
        self.class_names = list(CLASS_NAMES)

    def dataset(self, split: str) -> ShapeClassesDataset:
        self._check_split(split)
        return ShapeClassesDataset(split, self.lengths[split], self.image_size, 1, self.seed)

    def collate(self, items: list[dict]) -> dict:
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return {**super().collate(items), "label": labels, "class_names": self.class_names}

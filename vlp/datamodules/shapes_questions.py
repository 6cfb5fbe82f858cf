"""Questions about the shapes scenes with exact answers, for VQA that trains and tests with no files.

Seven question types, each answered from the scene itself (never from the image):
    colour    "what colour is the circle in the top left ?"        -> "red"
    shape     "what shape is the red shape ?"                      -> "square"
    position  "where is the small blue shape ?"                    -> "top left" / "center"
    count     "how many shapes are there ?"                        -> "3"
    count_of  "how many green shapes are there ?"                  -> "0".."9"
    exists    "is there a white cross ?"                           -> "yes" / "no"
    relation  "is the red shape left of the blue circle ?"         -> "yes" / "no"
Objects are named only by phrases that are unambiguous in their scene; "exists" and "relation" are true
half of the time. Answer types follow VQAv2 (`yes/no`, `number`, `other`). Training draws another question
per epoch; validation and test are fixed per image.
"""

from __future__ import annotations

import random

import numpy as np

from vlp.datamodules.shapes import (
    COLOURS,
    COLUMNS,
    GRID,
    RELATIONS,
    ROWS,
    SHAPES,
    Scene,
    ShapesDataset,
    ShapesSource,
)
from vlp.platform.metrics import vqa_score_matrix

POSITIONS = tuple(
    "center" if (r, c) == (1, 1) else f"{ROWS[r]} {COLUMNS[c]}" for r in range(3) for c in range(3)
)
ANSWERS = (*COLOURS, *SHAPES, *POSITIONS, *(str(n) for n in range(GRID * GRID + 1)), "yes", "no")
QUESTION_TYPES = ("colour", "shape", "position", "count", "count_of", "exists", "relation")
ANSWER_TYPES = {"count": "number", "count_of": "number", "exists": "yes/no", "relation": "yes/no"}
# the attributes a phrase may use to name the object a question asks about (never the asked attribute)
NAMING_KINDS = {
    "colour": (("shape",), ("size",), ("cell",)),
    "shape": (("colour",), ("size",), ("cell",)),
    "position": (("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "colour", "shape")),
    "relation": (("shape",), ("colour",), ("colour", "shape"), ("size", "colour", "shape")),
}


def unambiguous_phrases(scene: Scene, kinds: tuple[tuple[str, ...], ...]) -> list[tuple[int, str]]:
    """(object index, phrase) for every phrase of the given kinds that names one object of the scene."""
    phrases = (scene.phrase(i, kind) for i in range(len(scene.objects)) for kind in kinds)
    return [(p.object_index, p.text) for p in phrases if not p.ambiguous]


def relation_of(scene: Scene, first: int, second: int) -> str:
    """How objects[first] lies relative to objects[second] ("left of", "below and right of", ...)."""
    a, b = sorted((first, second))
    earlier, later = scene.objects[a], scene.objects[b]
    forward, inverse = RELATIONS[(earlier.row == later.row, int(np.sign(later.col - earlier.col)))]
    return forward if first == a else inverse


def ask(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, question type) for the scene; the type is drawn uniformly among those it allows."""
    while True:
        kind = rng.choice(QUESTION_TYPES)
        if kind in NAMING_KINDS:
            named = unambiguous_phrases(scene, NAMING_KINDS[kind])
            if not named or (kind == "relation" and len({i for i, _ in named}) < 2):
                continue
        if kind == "colour":
            index, phrase = rng.choice(named)
            return f"what colour is {phrase} ?", scene.objects[index].colour, kind
        if kind == "shape":
            index, phrase = rng.choice(named)
            return f"what shape is {phrase} ?", scene.objects[index].shape, kind
        if kind == "position":
            index, phrase = rng.choice(named)
            return f"where is {phrase} ?", scene.objects[index].position, kind
        if kind == "count":
            return "how many shapes are there ?", str(len(scene.objects)), kind
        if kind == "count_of":
            colour = rng.choice(list(COLOURS))
            count = sum(o.colour == colour for o in scene.objects)
            return f"how many {colour} shapes are there ?", str(count), kind
        if kind == "exists":
            present = {(o.colour, o.shape) for o in scene.objects}
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = rng.choice(sorted(present)) if rng.random() < 0.5 else rng.choice(absent)
            return f"is there a {colour} {shape} ?", "yes" if (colour, shape) in present else "no", kind
        first, first_phrase = rng.choice(named)
        second, second_phrase = rng.choice([(i, p) for i, p in named if i != first])
        truth = relation_of(scene, first, second)
        relation = truth if rng.random() < 0.5 else relation_of(scene, second, first)
        answer = "yes" if relation == truth else "no"
        return f"is {first_phrase} {relation} {second_phrase} ?", answer, kind


class ShapeQuestionsDataset(ShapesDataset):
    """Shapes items plus `question`, `answers` (the one exact answer) and `answer_type`."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        key = (
            f"question:{self.seed}:{index}:{self.epoch}"
            if self.split == "train"
            else f"question:{self.split}:{index}"
        )
        question, answer, kind = ask(self.scene(index), random.Random(key))
        return {
            **item,
            "question": question,
            "answers": [answer],
            "answer_type": ANSWER_TYPES.get(kind, "other"),
        }


class ShapeQuestionsSource(ShapesSource):
    """The shapes data with a question per image, for VQA (`vlp.tasks.vqa`). Batches add
    `question_input_ids`, `question_attention_mask` [B, Lq], `answer_scores` [B, A] (the VQA accuracy of
    each of the A = len(ANSWERS) candidate answers), `answers`, `answer_types`, `questions` and
    `answer_list`; the caption keys stay, so the same source also feeds the pre-training objectives."""

    def __init__(self, **kwargs) -> None:
        """The arguments of `ShapesSource`."""
        super().__init__(**kwargs)
        self.answer_list = list(ANSWERS)
        self.answer_index = {answer: i for i, answer in enumerate(ANSWERS)}  # ANSWERS are normalised

    def dataset(self, split: str) -> ShapeQuestionsDataset:
        self._check_split(split)
        return ShapeQuestionsDataset(split, self.lengths[split], self.image_size, self.max_objects, self.seed)

    def collate(self, items: list[dict]) -> dict:
        question_ids, question_mask = self._tokenize([item["question"] for item in items])
        return {
            **super().collate(items),
            "question_input_ids": question_ids,
            "question_attention_mask": question_mask,
            "questions": [item["question"] for item in items],
            "answers": [item["answers"] for item in items],
            "answer_types": [item["answer_type"] for item in items],
            "answer_scores": vqa_score_matrix([item["answers"] for item in items], self.answer_index),
            "answer_list": self.answer_list,
        }

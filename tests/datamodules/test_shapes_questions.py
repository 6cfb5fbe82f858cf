"""Shapes questions: every answer re-derived by an independent reading of the question against the scene,
the answer types and their balance, fixed validation questions, and the batch keys VQA reads."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vlp.datamodules.shapes import COLOURS, SHAPES, SIZES, Scene
from vlp.datamodules.shapes_questions import ANSWERS, ShapeQuestionsSource

POSITION_WORDS = {"top": 0, "middle": 1, "bottom": 2}
COLUMN_WORDS = {"left": 0, "middle": 1, "right": 2}


def position_of(row: int, col: int) -> str:
    return (
        "center"
        if (row, col) == (1, 1)
        else f"{['top', 'middle', 'bottom'][row]} {['left', 'middle', 'right'][col]}"
    )


def matching(scene: Scene, phrase: str) -> list[int]:
    """Indices of the objects a phrase such as "the small red shape in the top left" describes."""
    words = phrase.split()
    assert words[0] == "the", phrase
    cell = None
    if "in" in words:
        at = words.index("in")
        cell_words = words[at + 2 :]
        cell = (
            (1, 1)
            if cell_words == ["center"]
            else (POSITION_WORDS[cell_words[0]], COLUMN_WORDS[cell_words[1]])
        )
        words = words[:at]
    wanted = {"size": None, "colour": None, "shape": None}
    for word in words[1:]:
        key = (
            "size" if word in SIZES else "colour" if word in COLOURS else "shape" if word in SHAPES else None
        )
        if key is None:
            assert word == "shape", phrase
            continue
        wanted[key] = word
    return [
        i
        for i, o in enumerate(scene.objects)
        if all(value is None or getattr(o, key) == value for key, value in wanted.items())
        and (cell is None or (o.row, o.col) == cell)
    ]


def lies(a, b, relation: str) -> bool:
    """Whether object a lies `relation` of object b, from their grid cells."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "left of" if a.col < b.col else "right of" if a.col > b.col else ""
    expected = f"{vertical} and {horizontal}" if vertical and horizontal else vertical or horizontal
    return expected == relation


def answer_by_hand(scene: Scene, question: str) -> str:
    assert question.endswith(" ?"), question
    text = question[:-2]
    if text == "how many shapes are there":
        return str(len(scene.objects))
    if text.startswith("how many "):
        colour = text.split()[2]
        return str(sum(o.colour == colour for o in scene.objects))
    if text.startswith("is there a "):
        colour, shape = text.split()[3:5]
        return "yes" if any((o.colour, o.shape) == (colour, shape) for o in scene.objects) else "no"
    for prefix, attribute in (
        ("what colour is ", "colour"),
        ("what shape is ", "shape"),
        ("where is ", None),
    ):
        if text.startswith(prefix):
            (index,) = matching(scene, text[len(prefix) :])  # exactly one object: never ambiguous
            obj = scene.objects[index]
            return getattr(obj, attribute) if attribute else position_of(obj.row, obj.col)
    assert text.startswith("is the "), question
    for relation in (
        "above and left of",
        "above and right of",
        "below and left of",
        "below and right of",
        "left of",
        "right of",
        "above",
        "below",
    ):
        marker = f" {relation} the "
        if marker in text:
            first, second = text[3:].split(marker)
            (a,) = matching(scene, first)
            (b,) = matching(scene, "the " + second)
            return "yes" if lies(scene.objects[a], scene.objects[b], relation) else "no"
    raise AssertionError(f"unreadable question: {question}")


@pytest.fixture(scope="module")
def questions() -> ShapeQuestionsSource:
    return ShapeQuestionsSource(image_size=48, num_train=400, num_val=60, num_test=8, batch_size=8)


def test_every_answer_follows_from_the_scene(questions):
    dataset = questions.dataset("train")
    types, answers = Counter(), Counter()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["answers"] == [answer_by_hand(dataset.scene(index), item["question"])], item[
                "question"
            ]
            assert item["answers"][0] in ANSWERS
            types[item["answer_type"]] += 1
            answers[item["answers"][0]] += 1
    assert set(types) == {"yes/no", "number", "other"}
    assert min(types.values()) > 0.2 * sum(types.values())
    assert abs(answers["yes"] - answers["no"]) < 0.25 * (
        answers["yes"] + answers["no"]
    )  # not answerable blind


def test_validation_questions_are_fixed_and_training_questions_change_by_epoch(questions):
    val = questions.dataset("val")
    first = [val[i]["question"] for i in range(20)]
    val.set_epoch(3)
    assert [val[i]["question"] for i in range(20)] == first
    train = questions.dataset("train")
    before = [train[i]["question"] for i in range(20)]
    train.set_epoch(1)
    assert [train[i]["question"] for i in range(20)] != before


def test_batches_carry_tokenised_questions_and_one_hot_scores(questions):
    dataset = questions.dataset("val")
    items = [dataset[i] for i in range(8)]
    batch = questions.collate(items)
    assert batch["question_input_ids"].shape == batch["question_attention_mask"].shape
    assert batch["answer_scores"].shape == (8, len(ANSWERS))
    for row, item in enumerate(items):
        expected = torch.zeros(len(ANSWERS))
        expected[ANSWERS.index(item["answers"][0])] = 1.0
        torch.testing.assert_close(batch["answer_scores"][row], expected)
        decoded = questions.tokenizer.decode(batch["question_input_ids"][row], skip_special_tokens=True)
        assert decoded.replace(" ?", "?") == item["question"].replace(
            " ?", "?"
        )  # no [UNK]: words in the vocabulary
    assert batch["answer_list"] == list(ANSWERS)
    assert "input_ids" in batch and "boxes" in batch  # the pre-training keys stay

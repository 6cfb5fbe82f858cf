"""VQAv2-style data from files: questions JSON + annotations JSON per split, images under a root.

Questions file: `questions` [{question_id, image_id, question}] (and `data_subtype`, e.g. "train2014").
Annotations file: `annotations` [{question_id, answers [{answer}], answer_type?}]; a test split may have
none. The answer vocabulary is the `num_answers` most frequent normalised training answers (ViLT / BUTD:
3129 for VQAv2), or a file with one answer per line. Every question keeps all of its human answers: the
targets are each candidate's VQA accuracy against them, so training and `val/vqa/acc` use the soft score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.datamodules.annotations import UniqueIds, as_text, field, integer_field, list_field, read_json
from vlp.datamodules.captions import CaptionDataset, CaptionSource, annotation_path
from vlp.datamodules.images import SkipSample, check_caption, decode_image, image_path
from vlp.platform.metrics import normalize_answer, vqa_score_matrix

DEFAULT_IMAGE_PATTERN = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"
ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass(frozen=True)
class VQARecord:
    """One question about one image, with its human answers (empty on a test split without annotations)."""

    path: str
    image_id: int
    question_id: int
    question: str
    answers: tuple[str, ...]
    answer_type: str

    @property
    def captions(self) -> tuple[str, ...]:
        """The question, as the caption keys every source provides (and the corpus tokenizer reads)."""
        return (self.question,)


def read_vqa(
    questions_path: Path,
    annotations_path: Path | None,
    image_root: Path,
    pattern: str,
    skipped: Counter,
    allow_absolute: bool = False,
) -> list[VQARecord]:
    """One split's records; questions without annotations (when the split has them), annotations of
    unknown questions, empty questions and missing images are counted in `skipped`. Ids must be integers,
    question ids unique in each file, answers text (else a ValueError naming file, record and field)."""
    data = read_json(questions_path)
    subtype = data.get("data_subtype", "") if isinstance(data, dict) else ""
    if not isinstance(subtype, str):
        as_text(subtype, questions_path, "the top level", "data_subtype")
    annotations: dict[int, tuple[dict, str]] | None = None
    if annotations_path is not None:
        annotations = {}
        unique = UniqueIds(annotations_path, "question_id")
        entries = list_field(read_json(annotations_path), "annotations", annotations_path, "the top level")
        for number, entry in enumerate(entries):
            where = f"annotations[{number}]"
            question_id = integer_field(entry, "question_id", annotations_path, where)
            unique.add(question_id, where)
            annotations[question_id] = (entry, f"{where} (question_id {question_id})")
    records, known = [], UniqueIds(questions_path, "question_id")
    for number, entry in enumerate(list_field(data, "questions", questions_path, "the top level")):
        where = f"questions[{number}]"
        question_id = integer_field(entry, "question_id", questions_path, where)
        known.add(question_id, where)
        where = f"{where} (question_id {question_id})"
        image_id = integer_field(entry, "image_id", questions_path, where)
        try:
            question = check_caption(field(entry, "question", questions_path, where))
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        answers: tuple[str, ...] = ()
        answer_type = "other"
        if annotations is not None:
            if question_id not in annotations:
                skipped["unannotated_question"] += 1
                continue
            annotation, place = annotations[question_id]
            answers = tuple(
                as_text(
                    field(answer, "answer", annotations_path, f"{place}.answers[{index}]"),
                    annotations_path,
                    f"{place}.answers[{index}]",
                    "answer",
                    allow_empty=True,
                )
                for index, answer in enumerate(list_field(annotation, "answers", annotations_path, place))
            )
            if not answers:
                skipped["no_answers"] += 1
                continue
            answer_type = annotation.get("answer_type", "other")
            answer_type = answer_type if answer_type in ANSWER_TYPES else "other"
        try:
            path = image_path(
                image_root, pattern.format(data_subtype=subtype, image_id=image_id), allow_absolute
            )
            if not path.is_file():
                raise SkipSample("missing_file", str(path))
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        records.append(VQARecord(str(path), image_id, question_id, question, answers, answer_type))
    if annotations is not None:
        skipped["unknown_question"] += len(set(annotations) - set(known.first))
    return records


def answer_vocabulary(records: list[VQARecord], num_answers: int) -> list[str]:
    """The `num_answers` most frequent normalised answers (over every human answer), ties alphabetical."""
    counts = Counter(normalize_answer(a) for record in records for a in record.answers)
    counts.pop("", None)
    return [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers]]


class VQADataset(CaptionDataset):
    """Items: `image`, `image_id`, `question` (also as `caption`), `answers`, `answer_type`, `skipped`.
    Training augments with a random resized crop and no flip (questions say "left" and "right")."""

    def load(self, index: int) -> dict:
        record = self.records[index]
        image = decode_image(record.path, self.max_pixels, self.background)
        generator = self.augmentation_generator(index) if self.train else None
        pixels, _, _ = self.transform(image, generator=generator)
        return {
            "image": pixels,
            "image_id": record.image_id,
            "question_id": record.question_id,
            "caption": record.question,
            "question": record.question,
            "answers": list(record.answers),
            "answer_type": record.answer_type,
        }


class VQASource(CaptionSource):
    """VQAv2-style questions and answers per split (see the module docstring), images under `image_root`
    at `image_pattern` (fields `data_subtype`, `image_id`). Batches carry what `vlp.tasks.vqa` reads:
    `question_input_ids`, `question_attention_mask`, `answer_scores` [B, A], `answer_list`, `answers`,
    `answer_types`, `questions`, `question_id`; the caption keys hold the question."""

    dataset_class = VQADataset

    def __init__(
        self,
        train_questions: str | None = None,
        train_annotations: str | None = None,
        image_root: str | None = None,
        val_questions: str | None = None,
        val_annotations: str | None = None,
        test_questions: str | None = None,
        test_annotations: str | None = None,
        image_pattern: str = DEFAULT_IMAGE_PATTERN,
        num_answers: int = 3129,
        answer_list: str | None = None,
        **kwargs,
    ) -> None:
        if train_questions is None or train_annotations is None:
            raise ValueError("train_questions and train_annotations are required (VQAv2 JSON files)")
        if num_answers < 2:
            raise ValueError(f"num_answers must be >= 2, got {num_answers}")
        if kwargs.pop("flip", False):
            raise ValueError("VQASource does not flip images: questions and answers say left and right")
        self.files = {
            split: (
                annotation_path(questions, f"{split}_questions"),
                annotation_path(answers, f"{split}_annotations"),
            )
            for split, questions, answers in (
                ("train", train_questions, train_annotations),
                ("val", val_questions, val_annotations),
                ("test", test_questions, test_annotations),
            )
        }
        self.image_pattern = image_pattern
        super().__init__(image_root, flip=False, **kwargs)
        self.answer_list = (
            read_answer_list(answer_list)
            if answer_list
            else answer_vocabulary(self.records["train"], num_answers)
        )
        self.answer_index = {answer: i for i, answer in enumerate(self.answer_list)}

    def read(self, split: str) -> list[VQARecord] | None:
        questions, annotations = self.files[split]
        if questions is None:
            return None
        return read_vqa(
            questions,
            annotations,
            self.image_root,
            self.image_pattern,
            self.skipped,
            self.allow_absolute_paths,
        )

    def collate(self, items: list[dict]) -> dict:
        batch = super().collate(items)
        batch["question_input_ids"], batch["question_attention_mask"] = (
            batch["input_ids"],
            batch["attention_mask"],
        )
        batch.update(
            answer_scores=vqa_score_matrix([item["answers"] for item in items], self.answer_index),
            answer_list=self.answer_list,
            answers=[item["answers"] for item in items],
            answer_types=[item["answer_type"] for item in items],
            questions=[item["question"] for item in items],
            question_id=torch.tensor([item["question_id"] for item in items], dtype=torch.long),
        )
        return batch


def read_answer_list(path: str) -> list[str]:
    """One answer per line (normalised, blank lines ignored); duplicates are an error naming the line."""
    file = annotation_path(path, "answer_list")
    answers: list[str] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        answer = normalize_answer(line)
        if not answer:
            continue
        if answer in answers:
            raise ValueError(f"{file}: line {number}: answer {answer!r} appears twice")
        answers.append(answer)
    if len(answers) < 2:
        raise ValueError(f"{file}: needs at least 2 answers, got {len(answers)}")
    return answers

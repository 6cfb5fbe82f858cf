"""The VQAv2-style reader on generated files: records, the answer vocabulary, soft targets, counted skips,
clear errors, and a `vlp fit` of the VQA objective on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp.datamodules.vqa import VQASource, answer_vocabulary, read_answer_list

from .conftest import write_jpeg


def write_split(
    root: Path, images: Path, split: str, questions: list[tuple[int, int, str]], answers: dict
) -> tuple[Path, Path]:
    """questions: (question_id, image_id, text); answers: question_id -> (10 human answers, answer_type)."""
    subtype = f"{split}2014"
    for _, image_id, _ in questions:
        path = images / subtype / f"COCO_{subtype}_{image_id:012d}.jpg"
        if not path.exists() and image_id != 999:  # image 999 is missing on purpose
            write_jpeg(path, seed=image_id)
    q = {
        "data_subtype": subtype,
        "questions": [
            {"question_id": qid, "image_id": iid, "question": text} for qid, iid, text in questions
        ],
    }
    a = {
        "annotations": [
            {
                "question_id": qid,
                "answers": [{"answer": x, "answer_id": n + 1} for n, x in enumerate(human)],
                "answer_type": kind,
            }
            for qid, (human, kind) in answers.items()
        ]
    }
    (root / f"{split}_questions.json").write_text(json.dumps(q))
    (root / f"{split}_annotations.json").write_text(json.dumps(a))
    return root / f"{split}_questions.json", root / f"{split}_annotations.json"


@pytest.fixture
def vqa_folder(tmp_path: Path) -> dict[str, str]:
    images = tmp_path / "images"
    train_questions = [(i, i // 2, f"is picture {i // 2} bright ?") for i in range(40)]
    train_answers = {
        i: (
            ["yes"] * 7 + ["no"] * 3 if i % 2 else ["two"] * 3 + ["2"] + ["3"] * 6,
            "yes/no" if i % 2 else "number",
        )
        for i in range(40)
    }
    train_questions += [(100, 999, "where is it ?"), (101, 3, "   "), (102, 4, "what is unannotated ?")]
    train_answers[100] = (["here"] * 10, "other")
    train_answers[101] = (["x"] * 10, "other")
    train_answers[555] = (["y"] * 10, "other")  # names a question that does not exist
    tq, ta = write_split(tmp_path, images, "train", train_questions, train_answers)
    val_questions = [(200 + i, 50 + i, f"what colour is {i} ?") for i in range(6)]
    val_answers = {200 + i: (["red"] * (i + 1) + ["blue"] * (9 - i), "other") for i in range(6)}
    vq, va = write_split(tmp_path, images, "val", val_questions, val_answers)
    test_questions = [(300 + i, 70 + i // 2, f"is {i} bright ?") for i in range(5)]  # two per image
    testq, _ = write_split(tmp_path, images, "test", test_questions, {})
    return {
        "test_questions": str(testq),
        "train_questions": str(tq),
        "train_annotations": str(ta),
        "val_questions": str(vq),
        "val_annotations": str(va),
        "image_root": str(images),
    }


def test_records_vocabulary_and_counted_skips(vqa_folder):
    source = VQASource(**vqa_folder, image_size=32, batch_size=4, num_answers=4)
    train = source.records["train"]
    assert len(train) == 40
    assert {r.question_id for r in train} == set(range(40))
    assert dict(source.skipped) == {
        "missing_file": 1,
        "empty_caption": 1,
        "unannotated_question": 1,
        "unknown_question": 1,
    }
    # every human answer counts: "2" (3x two + 1x 2 on 20 questions = 80), "yes" 140, "3" 120, "no" 60
    assert source.answer_list == ["yes", "3", "2", "no"]
    assert answer_vocabulary(train, 2) == ["yes", "3"]


def test_soft_targets_are_the_vqa_accuracy_of_each_candidate(vqa_folder, tmp_path):
    listed = tmp_path / "answers.txt"
    listed.write_text("yes\nno\nred\nblue\ngreen\n")
    source = VQASource(**vqa_folder, image_size=32, batch_size=6, answer_list=str(listed))
    dataset = source.dataset("val")
    batch = source.collate([dataset[i] for i in range(6)])
    soft = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}  # VQA accuracy of an answer k of 10 humans gave (k >= 4: 1)
    for row in range(6):
        reds, blues = row + 1, 9 - row
        expected = torch.tensor([0.0, 0.0, soft.get(reds, 1.0), soft.get(blues, 1.0), 0.0])
        torch.testing.assert_close(batch["answer_scores"][row], expected)
    assert batch["questions"][0] == "what colour is 0 ?"
    assert batch["answers"][0] == ["red"] + ["blue"] * 9
    torch.testing.assert_close(batch["question_input_ids"], batch["input_ids"])
    assert batch["question_id"].tolist() == list(range(200, 206))
    assert batch["image"].shape == (6, 3, 32, 32)


def test_answer_list_file_and_its_errors(vqa_folder, tmp_path):
    listed = tmp_path / "answers.txt"
    listed.write_text("Yes\n\nno\nred\n")
    source = VQASource(**vqa_folder, image_size=32, batch_size=4, answer_list=str(listed))
    assert source.answer_list == ["yes", "no", "red"]
    listed.write_text("yes\nno\nYes.\n")
    with pytest.raises(ValueError, match=r"answers.txt: line 3: answer 'yes' appears twice"):
        read_answer_list(str(listed))


def test_bad_configuration_is_a_clear_error(vqa_folder, tmp_path):
    with pytest.raises(ValueError, match="train_questions and train_annotations"):
        VQASource(image_root=vqa_folder["image_root"], train_questions=vqa_folder["train_questions"])
    with pytest.raises(FileNotFoundError, match="val_annotations"):
        VQASource(**{**vqa_folder, "val_annotations": str(tmp_path / "nope.json")})
    with pytest.raises(ValueError, match="does not flip"):
        VQASource(**vqa_folder, flip=True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"questions": [\n  {"question_id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 2"):
        VQASource(**{**vqa_folder, "train_questions": str(broken)})
    missing_field = tmp_path / "fields.json"
    missing_field.write_text(json.dumps({"questions": [{"question_id": 1, "question": "q ?"}]}))
    with pytest.raises(
        ValueError, match=r"fields.json: questions\[0\] \(question_id 1\) has no field 'image_id'"
    ):
        VQASource(**{**vqa_folder, "train_questions": str(missing_field)})


def test_vqa_config_trains_on_a_vqa_folder_and_writes_metrics(vqa_folder, tmp_path, monkeypatch, one_thread):
    from vlp.cli import run

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[2] / "configs" / "finetune" / "vqa.yaml"
    cli = run(
        ["fit", "--config", str(config)]
        + [f"--data.{key}={value}" for key, value in vqa_folder.items()]
        + [
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false",
            "--data.max_bad_fraction=0.1",
            "--data.sources.vqa.init_args.num_answers=4",
            "--data.sources.vqa.init_args.batch_size=4",
            "--data.sources.vqa.init_args.num_workers=0",
            "--data.sources.vqa.init_args.image_size=32",
            "--model.init_args.objectives.vqa.init_args.num_answers=4",
            "--model.init_args.backbone.init_args.vision={image_size: 32, patch_size: 16, width: 32, depth: 1, heads: 2}",
            "--model.init_args.backbone.init_args.text={width: 32, depth: 1, heads: 2, max_len: 40}",
            "--model.init_args.backbone.init_args.fusion={depth: 1, heads: 2}",
        ]
    )
    assert cli.trainer.global_step == 3
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    # val answers (red/blue) are outside the 4 training answers: VQA accuracy 0 whatever the model says
    assert metrics["val/vqa/acc"] == 0.0
    assert {"val/vqa/loss", "val/vqa/acc_other", "train/vqa/loss"} <= set(metrics)
    assert cli.datamodule.skipped == {
        "missing_file": 1,
        "empty_caption": 1,
        "unannotated_question": 1,
        "unknown_question": 1,
    }
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path).resolve()
    predicted = run(
        [
            "predict",
            "--config",
            str(Path(cli.trainer.log_dir) / "config.yaml"),
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    answers = json.loads((Path(predicted.trainer.log_dir) / "answers.json").read_text())
    assert sorted(answers) == [str(300 + i) for i in range(5)]  # one answer per question, not per image
    assert set(answers.values()) <= set(cli.datamodule.sources["vqa"].answer_list)

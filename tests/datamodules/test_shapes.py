import pickle
from collections import Counter

import pytest
import torch

from vlp.datamodules.shapes import (
    BACKGROUND,
    COLOURS,
    SIZE_SYNONYMS,
    Scene,
    SceneObject,
    ShapesSource,
    layout_key,
)
from vlp.datamodules.tokenizer import build_wordpiece_tokenizer


@pytest.fixture(scope="module")
def source():
    return ShapesSource(num_train=400, num_val=200, num_test=200)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1] back to the rendered [H, W, 3] bytes."""
    return ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


def hand_built_object(shape: str, colour: str, size: str, row: int, col: int) -> SceneObject:
    x0, y0 = 21 * col + 2, 21 * row + 2
    return SceneObject(shape, colour, size, row, col, (x0, y0, x0 + 10, y0 + 10), (0.5, 0.5, 0.1, 0.1))


def test_same_seed_and_index_give_identical_items():
    first, second = ShapesSource(seed=3).dataset("train"), ShapesSource(seed=3).dataset("train")
    first.set_epoch(2)
    second.set_epoch(2)
    for index in (0, 7, 19999):
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])
        assert (a["caption"], a["references"], a["phrase"]) == (b["caption"], b["references"], b["phrase"])


def test_items_of_a_later_epoch_equal_those_of_a_fresh_dataset(monkeypatch):
    """The scene cache (layouts, references, phrases) changes no item, and a bounded cache starts over."""
    import vlp.datamodules.shapes as shapes_module

    monkeypatch.setattr(shapes_module, "SCENE_CACHE_SIZE", 5)
    used = ShapesSource(seed=1).dataset("train")
    for index in range(8):  # fills the cache past its bound once
        used[index]["references"].append("mutated by a caller")
    assert 0 < len(used._scenes) <= 5
    for epoch in (1, 3):
        used.set_epoch(epoch)
        fresh = ShapesSource(seed=1).dataset("train")
        fresh.set_epoch(epoch)
        for index in range(8):
            a, b = used[index], fresh[index]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])
            assert (a["caption"], a["references"], a["phrase"]) == (
                b["caption"],
                b["references"],
                b["phrase"],
            )


def test_different_indices_and_seeds_give_different_images(source):
    dataset = source.dataset("val")
    images = torch.stack([dataset[index]["image"] for index in range(20)]).flatten(1)
    assert torch.cdist(images, images).add(torch.eye(20)).min() > 0
    other = ShapesSource(seed=1).dataset("val")
    assert sum(torch.equal(dataset[i]["image"], other[i]["image"]) for i in range(20)) == 0


def test_splits_share_no_caption_and_layout():
    source = ShapesSource(num_train=3000, num_val=500, num_test=500)
    keys = {}
    for split in ("train", "val", "test"):
        dataset = source.dataset(split)
        scenes = [dataset.scene(index) for index in range(len(dataset))]
        keys[split] = {(scene.references()[0], layout_key(scene)) for scene in scenes}
    # single-object layouts are few (4 shapes x 6 colours x 2 sizes x 9 cells): independently drawn splits of
    # these sizes share about a dozen of them (measured); the layout hash makes the overlap exactly zero
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )


def test_val_canonical_captions_rarely_repeat():
    dataset = ShapesSource().dataset("val")
    captions = Counter(dataset.scene(index).references()[0] for index in range(500))
    shared = sum(count for count in captions.values() if count > 1)
    assert shared / 500 < 0.02


def test_used_phrase_is_unambiguous_and_its_box_bounds_the_object_pixels(source):
    for split in ("train", "val"):
        dataset = source.dataset(split)
        for index in range(60):
            item, scene = dataset[index], dataset.scene(index)
            matches = [p for p in scene.phrases() if p.text == item["phrase"] and not p.ambiguous]
            assert len(matches) == 1
            target = scene.objects[matches[0].object_index]
            assert torch.allclose(item["box"], torch.tensor(target.box))
            pixels = to_uint8(item["image"])
            cell = (
                slice(target.row * 64 // 3, (target.row + 1) * 64 // 3),
                slice(target.col * 64 // 3, (target.col + 1) * 64 // 3),
            )
            mask = torch.zeros(64, 64, dtype=torch.bool)
            mask[cell] = (pixels[cell] == torch.tensor(COLOURS[target.colour], dtype=torch.uint8)).all(-1)
            ys, xs = mask.nonzero(as_tuple=True)
            cx, cy, w, h = (item["box"] * 64).tolist()
            # tight: the object's pixels span exactly the box (pixel edges at cx +- w/2)
            assert (xs.min().item(), xs.max().item() + 1) == pytest.approx((cx - w / 2, cx + w / 2))
            assert (ys.min().item(), ys.max().item() + 1) == pytest.approx((cy - h / 2, cy + h / 2))


def test_ambiguity_flag_on_hand_built_scene():
    scene = Scene(
        64,
        (
            hand_built_object("square", "red", "small", 0, 0),
            hand_built_object("circle", "red", "large", 0, 2),
            hand_built_object("square", "blue", "large", 2, 1),
        ),
    )
    flags = {(p.text, p.object_index): p.ambiguous for p in scene.phrases()}
    assert flags[("the square", 0)] and flags[("the square", 2)]
    assert flags[("the red shape", 0)] and flags[("the large shape", 1)]
    assert not flags[("the circle", 1)] and not flags[("the small shape", 0)]
    assert not flags[("the red square", 0)] and not flags[("the blue shape", 2)]
    assert not flags[("the shape in the bottom middle", 2)]


def test_every_object_has_an_unambiguous_phrase_even_with_nine_objects():
    dataset = ShapesSource(max_objects=9, num_train=100).dataset("train")
    for index in range(100):
        scene = dataset.scene(index)
        unambiguous = {p.object_index for p in scene.phrases() if not p.ambiguous}
        assert unambiguous == set(range(len(scene.objects)))


def test_canonical_caption_describes_every_object(source):
    dataset = source.dataset("val")
    for index in range(100):
        scene = dataset.scene(index)
        canonical = scene.references()[0]
        assert dataset[index]["caption"] == canonical
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in canonical


def test_relation_words_match_the_geometry(source):
    dataset = source.dataset("train")
    checked = 0
    for index in range(200):
        scene = dataset.scene(index)
        if len(scene.objects) < 2:
            continue
        first, second = scene.objects[0].box, scene.objects[1].box
        canonical = scene.references()[0]
        assert ("left of" in canonical) == (first[0] < second[0] - 0.2)
        assert ("right of" in canonical) == (first[0] > second[0] + 0.2)
        assert ("above" in canonical) == (first[1] < second[1] - 0.2)
        checked += 1
    assert checked > 150


def test_references_are_five_distinct_paraphrases(source):
    dataset = source.dataset("test")
    for index in range(100):
        scene = dataset.scene(index)
        references = scene.references()
        assert len(set(references)) == len(references) == 5
        for reference in references:
            for obj in scene.objects:
                assert obj.colour in reference
                assert obj.size in reference or SIZE_SYNONYMS[obj.size] in reference


def test_train_caption_and_phrase_vary_with_epoch_while_val_is_fixed(source):
    train, val = source.dataset("train"), source.dataset("val")
    captions, phrases, val_items = set(), set(), set()
    for epoch in range(12):
        train.set_epoch(epoch)
        val.set_epoch(epoch)
        captions.add(train[5]["caption"])
        phrases.add(train[5]["phrase"])
        val_items.add((val[5]["caption"], val[5]["phrase"]))
    assert len(captions) >= 3 and len(phrases) >= 2
    assert captions <= set(train[5]["references"])
    assert len(val_items) == 1


def test_image_is_normalised_with_background_at_its_colour(source):
    image = source.dataset("val")[0]["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert image.min() >= -1 and image.max() <= 1
    background = torch.tensor(BACKGROUND) / 127.5 - 1
    assert torch.allclose(image[:, 0, 0], background)


def test_collate_pads_to_longest_and_truncates(source):
    dataset = source.dataset("train")
    items = [dataset[index] for index in range(6)]
    batch = source.collate(items)
    assert batch["image"].shape == (6, 3, 64, 64)
    assert batch["image_id"].tolist() == list(range(6)) and batch["image_id"].dtype == torch.long
    assert batch["boxes"].shape == (6, 4) and batch["boxes"].dtype == torch.float32
    tokenizer = source.tokenizer
    for ids_key, mask_key, texts in [
        ("input_ids", "attention_mask", batch["captions"]),
        ("phrase_input_ids", "phrase_attention_mask", batch["phrases"]),
    ]:
        ids, mask = batch[ids_key], batch[mask_key]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
        lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
        assert ids.shape[1] == max(lengths) and mask.sum(1).tolist() == lengths
        assert ids[:, 0].eq(tokenizer.cls_token_id).all()
        assert ids[mask == 0].eq(tokenizer.pad_token_id).all()
        assert ids[torch.arange(6), mask.sum(1) - 1].eq(tokenizer.sep_token_id).all()
    assert batch["captions"] == [item["caption"] for item in items]
    assert batch["references"][0] == items[0]["references"]
    short = ShapesSource(max_text_len=8).collate(items)
    assert short["input_ids"].shape[1] == 8 and short["input_ids"][:, -1].eq(tokenizer.sep_token_id).all()


def test_collate_survives_pickling_and_feeds_a_dataloader(source):
    collate = pickle.loads(pickle.dumps(source.collate))
    items = [source.dataset("val")[index] for index in range(3)]
    assert torch.equal(collate(items)["input_ids"], source.collate(items)["input_ids"])
    batch = next(iter(ShapesSource(num_train=10, batch_size=4).dataloader("train")))
    assert batch["image"].shape == (4, 3, 64, 64)


def test_local_tokenizer_directory_is_used(tmp_path):
    build_wordpiece_tokenizer(["a", "small", "little", "large", "big", "red", "blue"]).save_pretrained(
        tmp_path
    )
    source = ShapesSource(tokenizer=str(tmp_path))
    assert source.tokenizer.vocab_size == 12
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        ShapesSource(tokenizer=str(tmp_path / "missing-dir"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"image_size": 16}, "image_size"),
        ({"num_val": 0}, "num_val"),
        ({"max_text_len": 1}, "max_text_len"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesSource(**kwargs)


def test_bad_split_and_index_raise(source):
    with pytest.raises(ValueError, match="'validation'"):
        source.dataset("validation")
    with pytest.raises(IndexError, match="200"):
        source.describe("val", 200)


def test_cached_tokenization_equals_the_tokenizers_batch_call():
    source = ShapesSource(image_size=32, num_train=8, num_val=4, num_test=4, max_text_len=6, batch_size=4)
    texts = ["a red circle", "a small blue square in the top left", "a red circle", "there is a big plus"]
    for _ in range(2):  # the second call reads every text from the cache
        ids, mask = source._tokenize(texts)
        expected = source.tokenizer(
            texts, padding="longest", truncation=True, max_length=6, return_tensors="pt"
        )
        torch.testing.assert_close(ids, expected["input_ids"])
        torch.testing.assert_close(mask, expected["attention_mask"])
    assert ids.shape == (4, 6)  # the long caption is truncated at max_text_len, not an error

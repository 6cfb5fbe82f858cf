import pickle

import pytest

from vlp.datamodules.shapes import GRAMMAR_WORDS, ShapesSource
from vlp.datamodules.tokenizer import build_wordpiece_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_wordpiece_tokenizer(GRAMMAR_WORDS)


@pytest.fixture(scope="module")
def generated_texts():
    source = ShapesSource(max_objects=4, num_train=300)
    dataset = source.dataset("train")
    texts = []
    for index in range(300):
        scene = dataset.scene(index)
        texts += scene.references() + [phrase.text for phrase in scene.phrases()]
    return texts


def test_special_token_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id) == (0, 1, 2)
    assert (tokenizer.sep_token_id, tokenizer.mask_token_id) == (3, 4)
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2, 3, 4]
    assert tokenizer.vocab_size == 5 + len(set(GRAMMAR_WORDS))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_encoding_wraps_text_in_cls_and_sep(tokenizer):
    ids = tokenizer("a small red circle")["input_ids"]
    assert len(ids) == 6
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_round_trip_of_generated_text_has_no_unknown_words(tokenizer, generated_texts):
    encoded = tokenizer(generated_texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == generated_texts


def test_padding_uses_pad_id_and_zero_mask(tokenizer):
    batch = tokenizer(
        ["a circle", "a small red circle left of a box"], padding="longest", return_tensors="pt"
    )
    assert batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"][0, 4:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [4, 10]


def test_text_is_lowercased_and_unknown_words_map_to_unk(tokenizer):
    assert tokenizer("A Small RED Circle")["input_ids"] == tokenizer("a small red circle")["input_ids"]
    assert tokenizer("a zebra")["input_ids"][2] == tokenizer.unk_token_id


def test_words_that_are_not_one_pre_token_are_rejected():
    with pytest.raises(ValueError, match="left of"):
        build_wordpiece_tokenizer(["a", "left of"])
    with pytest.raises(ValueError, match="empty"):
        build_wordpiece_tokenizer([])
    with pytest.raises(TypeError, match="strings"):
        build_wordpiece_tokenizer(["a", 3])


def test_duplicate_and_uppercase_words_collapse_to_one_id():
    tokenizer = build_wordpiece_tokenizer(["Red", "red", "blue"])
    assert tokenizer.vocab_size == 7
    assert tokenizer.convert_tokens_to_ids(["red", "blue"]) == [5, 6]


def test_tokenizer_survives_pickling(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone("a big blue box")["input_ids"] == tokenizer("a big blue box")["input_ids"]


def test_load_tokenizer_reads_a_saved_directory(tokenizer, tmp_path, generated_texts):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(generated_texts[:50])["input_ids"] == tokenizer(generated_texts[:50])["input_ids"]
    assert (loaded.pad_token_id, loaded.mask_token_id, loaded.cls_token_id, loaded.sep_token_id) == (
        0,
        4,
        2,
        3,
    )
    assert sorted(loaded.all_special_ids) == [0, 1, 2, 3, 4]


def test_load_tokenizer_names_a_missing_directory(tmp_path):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(missing)

"""Text tokenizers: a tiny offline WordPiece over a closed vocabulary, or a real BERT vocab from disk.

The synthetic data has a grammar of a few dozen words, so a whole-word WordPiece built in memory keeps the
text tower tiny and needs no download; a real vocab (for a pretrained text encoder) loads from a local folder.
"""

import os
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_wordpiece_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """BERT-style tokenizer whose vocabulary is exactly the specials (ids 0-4) then the given whole words.

    Words are lowercased and deduplicated (first occurrence wins the lower id); each must survive the BERT
    pre-tokenizer as one piece, otherwise it could never be produced and a ValueError names it.
    """
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words must be strings, got {word!r} of type {type(word).__name__}")
        word = word.lower()
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(f"word {word!r} is not a single BERT pre-token (it splits into {pieces})")
        vocab.setdefault(word, len(vocab))
    if len(vocab) == len(SPECIAL_TOKENS):
        raise ValueError("words is empty: the tokenizer needs at least one word")

    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        lowercase=True, clean_text=True, handle_chinese_chars=True
    )
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A saved tokenizer (e.g. a BERT `vocab.txt` / `tokenizer.json` folder), read offline from `path`.

    Goes through `AutoTokenizer.from_pretrained`, because `BertTokenizerFast(vocab_file=...)` silently ignores
    the file in transformers 5.x and would hand back an all-[UNK] tokenizer.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_corpus_tokenizer(
    texts: Iterable[str], min_count: int = 1, max_words: int | None = None
) -> PreTrainedTokenizerFast:
    """A whole-word WordPiece over the words of `texts` (BERT-normalised and pre-tokenised), for small
    models trained from scratch on real captions without a vocabulary file.

    Words seen fewer than `min_count` times become [UNK]; the order (count, then alphabetical) depends only
    on the texts, so every rank and every resumed run builds the same ids.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return build_wordpiece_tokenizer(words[:max_words] if max_words is not None else words)

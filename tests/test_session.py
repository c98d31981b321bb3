"""What runs share: only through an explicit Session; cache keys that tell tokenizers apart."""

from __future__ import annotations

from prefnb import models
from prefnb.precompute import Encoders
from prefnb.session import Session


def _word_tokenizer(normalizer=None):
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(token_models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="[UNK]")


def test_the_reference_cache_key_tells_apart_tokenizers_that_differ_only_in_normalisation():
    from tokenizers import normalizers

    plain, lowercase = _word_tokenizer(), _word_tokenizer(normalizers.Lowercase())
    assert plain("A b")["input_ids"] != lowercase("A b")["input_ids"]  # the same text, other ids
    assert models.tokenizer_fingerprint(plain) == models.tokenizer_fingerprint(lowercase)  # vocabulary + ids alike
    assert Encoders(plain, 64, True).identity != Encoders(lowercase, 64, True).identity
    assert Encoders(plain, 64, True).identity == Encoders(_word_tokenizer(), 64, True).identity  # same files


def test_encoders_are_shared_only_within_a_session():
    tokenizer = models.tiny_tokenizer()
    session = Session()
    shared = Encoders.of(tokenizer, 64, True, session)
    assert Encoders.of(models.tiny_tokenizer(), 64, True, session) is shared  # a later run of the sweep
    assert Encoders.of(tokenizer, 64, False, session) is not shared  # other settings
    assert Encoders.of(tokenizer, 64, True) is not Encoders.of(tokenizer, 64, True)  # no session: nothing kept


def test_a_session_memo_keeps_its_newest_keys():
    session, calls = Session(), []
    for key in (1, 2, 1, 3, 1):
        session.memo("kind", key, lambda key=key: calls.append(key) or key, keep=2)
    assert calls == [1, 2, 3, 1]  # 1 was kept until 3 pushed it out

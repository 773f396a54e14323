"""Step-LLM tokenizer ids and masks against the official `Wrapped_StepChatTokenizer`.

Fixtures: `step_llm_vocab` (the released 65,536-piece model, shipped in the package) and `step_llm`
(its small model file); every row, both max lengths, exactly.
"""
import numpy as np
import pytest

from stepvideo_jax.text.sentencepiece_tokenizer import RELEASED_MODEL, StepLLMTokenizer
from tests.fixtures import fixture_dir, load_json, load_npz

FIXTURES = {"step_llm_vocab": RELEASED_MODEL, "step_llm": None}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def case(request):
    name = request.param
    model = FIXTURES[name] or fixture_dir(name) / "step1_chat_tokenizer.model"
    texts = [row["text"] for row in load_json(name, "prompts.json")]
    return name, StepLLMTokenizer(model), texts, load_npz(name, "tokenizer_cases.npz")


def test_sentencepiece_ids(case):
    name, tok, texts, ref = case
    flat, off = ref["sp_ids_flat"], ref["sp_ids_offsets"]
    assert len(texts) == len(off) - 1
    got = tok.encode(texts)
    wrong = [r for r in range(len(texts)) if got[r] != flat[off[r]:off[r + 1]].tolist()]
    assert not wrong, f"{name}: raw ids differ on rows {wrong}"


@pytest.mark.parametrize("suffix", ["", "_ml16"])
def test_wrapper_ids_and_mask(case, suffix):
    name, tok, texts, ref = case
    want_ids, want_mask = ref[f"input_ids{suffix}"], ref[f"attention_mask{suffix}"]
    batch = tok(texts, max_length=want_ids.shape[1])
    assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32
    bad_rows = np.flatnonzero((batch.input_ids != want_ids).any(1) | (batch.attention_mask != want_mask).any(1))
    assert bad_rows.size == 0, f"{name}{suffix}: rows {bad_rows.tolist()} differ"
    # packed form of the official wrapper, derived from ours
    np.testing.assert_array_equal(batch.input_ids[batch.attention_mask != 0], ref[f"cu_input_ids{suffix}"])
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(batch.attention_mask.sum(1))]),
                                  ref[f"cu_seqlens{suffix}"])


def test_empty_list_and_single_string(case):
    name, tok, texts, ref = case
    batch = tok([], max_length=ref["empty_list_input_ids"].shape[1])
    np.testing.assert_array_equal(batch.input_ids, ref["empty_list_input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, ref["empty_list_attention_mask"])
    one = tok(texts[0], max_length=ref["input_ids"].shape[1])
    np.testing.assert_array_equal(one.input_ids, ref["input_ids"][:1])


def test_tensorflow_sees_no_gpu(case):
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == []


def test_bad_inputs_are_rejected(case, tmp_path):
    _, tok, _, _ = case
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)
    with pytest.raises(TypeError, match="strings"):
        tok(["a", 3])
    with pytest.raises(FileNotFoundError, match="not found"):
        StepLLMTokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        StepLLMTokenizer(tmp_path / "bad.model")

import pytest

from influcoder.data import Record
from influcoder.models import tiny_tokenizer
from influcoder.tokenization import IGNORE, collate, tokenize_record, tokenize_records


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_response_only_loss_with_chat_template(tok):
    ex = tokenize_record(Record("a", "What is two plus two?", "It is four."), tok, 256)
    n_prompt = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert all(t == IGNORE for t in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.input_ids[n_prompt:]).startswith("It is four.")
    # the whole sequence is exactly what the chat template renders
    full = tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"},
                                    {"role": "assistant", "content": "It is four."}], tokenize=False)
    assert tok.decode(ex.input_ids) == full


def test_response_only_loss_without_chat_template(tok):
    ex = tokenize_record(Record("a", "What is two plus two?", "It is four."), tok, 256, chat_template="never")
    n_prompt = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert tok.decode(ex.input_ids[:n_prompt]) == "What is two plus two?\n"
    assert tok.decode(ex.input_ids[n_prompt:]) == "It is four." + tok.eos_token


def test_text_has_loss_on_every_token(tok):
    ex = tokenize_record(Record("t", text="Water boils at 100 degrees."), tok, 256)
    assert ex.labels == ex.input_ids and ex.n_loss_tokens == len(ex.input_ids) - 1


def test_truncation_is_counted(tok):
    recs = [Record("short", "Hi?", "Yes."), Record("long", "Tell me.", "Sure. " * 40), Record("p", "word " * 80, "cut")]
    exs, stats = tokenize_records(recs, tok, max_length=48)
    assert all(len(e.input_ids) <= 48 for e in exs)
    assert [e.truncated for e in exs] == [False, True, True]
    assert stats.n_truncated == 2
    # the third lost its whole response to truncation: counted, not hidden
    assert stats.n_no_loss == 1 and stats.no_loss_ids == ["p"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_either_side(tok, side):
    a = tokenize_record(Record("a", "Hi?", "Yes."), tok, 64)
    b = tokenize_record(Record("b", "A longer question here?", "A longer answer."), tok, 64)
    batch = collate([a, b], tok.pad_token_id, side)
    n = len(a.input_ids)
    row = batch["input_ids"][0].tolist()
    kept = row[:n] if side == "right" else row[-n:]
    assert kept == a.input_ids and batch["attention_mask"][0].sum() == n
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()

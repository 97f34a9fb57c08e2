import pytest
import torch

from influcoder.config import LoraConfig, ModelConfig
from influcoder.data import Record
from influcoder.models import ModelError, load_decoder, load_encoder, tiny_decoder
from influcoder.tokenization import collate, tokenize_record


def lora_b(model):
    return {n: p for n, p in model.named_parameters() if "lora_B" in n}


def test_tiny_decoder_is_deterministic():
    a, _ = tiny_decoder(seed=3)
    b, _ = tiny_decoder(seed=3)
    c, _ = tiny_decoder(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_fresh_lora_has_zero_b_and_seeded_a():
    d1 = load_decoder(ModelConfig(name="random:llama", lora=LoraConfig(rank=4, seed=1)))
    d2 = load_decoder(ModelConfig(name="random:llama", lora=LoraConfig(rank=4, seed=1)))
    d3 = load_decoder(ModelConfig(name="random:llama", lora=LoraConfig(rank=4, seed=2)))
    assert d1.fresh_adapter
    assert lora_b(d1.model) and all((p == 0).all() for p in lora_b(d1.model).values())
    a = lambda d: [p for n, p in d.model.named_parameters() if "lora_A" in n]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(a(d1), a(d2)))
    assert not all(torch.equal(x, y) for x, y in zip(a(d1), a(d3)))
    # base weights are frozen: only LoRA matrices would get gradients
    assert all("lora_" in n for n, p in d1.model.named_parameters() if p.requires_grad)


def test_saved_adapter_loads_back(tmp_path):
    d = load_decoder(ModelConfig(name="random:llama"))
    with torch.no_grad():
        for p in lora_b(d.model).values():
            p.normal_()
    d.model.save_pretrained(tmp_path / "adapter")
    again = load_decoder(ModelConfig(name="random:llama", adapter=str(tmp_path / "adapter")))
    assert not again.fresh_adapter
    for (n, p), (m, q) in zip(sorted(lora_b(d.model).items()), sorted(lora_b(again.model).items())):
        assert torch.equal(p, q)


def test_bad_adapter_and_targets_are_clear(tmp_path):
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_decoder(ModelConfig(name="random:llama", adapter=str(tmp_path)))
    with pytest.raises(ModelError, match="Linear modules in this model: .*q_proj"):
        load_decoder(ModelConfig(name="random:llama", lora=LoraConfig(target_modules=["c_attn"])))
    with pytest.raises(ModelError, match="unknown tiny architecture"):
        load_decoder(ModelConfig(name="random:gpt9"))


def test_tiny_encoder_embeds():
    enc = load_encoder("random:bert", device="cpu")
    e = enc.encode(["hello there", "a second sentence"])
    assert e.shape == (2, 32)


def test_embedded_minilm_loads():
    enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    e = enc.encode(["The cat sat.", "A cat was sitting.", "Stock prices fell."], normalize_embeddings=True)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2]


@pytest.mark.slow
def test_embedded_smollm2_with_lora_forward():
    d = load_decoder(ModelConfig(device="cpu"))
    assert d.fresh_adapter and "SmolLM2" in d.source
    ex = tokenize_record(Record("x", "What is the capital of France?", "Paris."), d.tokenizer, 64)
    batch = collate([ex], d.tokenizer.pad_token_id)
    with torch.no_grad():
        out = d.model(**batch)
    assert out.logits.shape[-1] == 49152
    # a real instruction model finds its own answer likely: far below uniform (ln 49152 = 10.8)
    assert out.loss.item() < 4.0

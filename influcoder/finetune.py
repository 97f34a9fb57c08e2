"""LoRA fine-tune of the decoder on the pool, with the Hugging Face Trainer.

Attribution is taken at the model that learned from the data: gradients at an untrained point
mostly measure format (DESIGN §5). This stage writes `<run>/finetune/adapter/` (a PEFT adapter),
`adam.safetensors` (the optimizer's moments, for the LESS-style `adam` preconditioner) and
`finetune.json` (loss curve, settings).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .config import Config
from .data import load_split
from .gradients import forward_loss, lora_modules
from .models import load_decoder
from .precondition import AdamDirection
from .tokenization import Example, collate, tokenize_records


def finetune_dir(cfg: Config) -> Path:
    return cfg.run_dir / "finetune"


def adapter_path(cfg: Config) -> Path:
    return finetune_dir(cfg) / "adapter"


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def finetune(cfg: Config, progress: bool = True) -> dict:
    """Train a fresh LoRA (model.lora, seeded by finetune.seed) on the pool; returns the report."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _Bar(ProgressCallback):
        def on_log(self, *args, **kwargs):  # the loss curve goes to finetune.json, not the terminal
            pass

    f = cfg.finetune
    if f.torch_threads:
        torch.set_num_threads(f.torch_threads)
    mcfg = cfg.model.model_copy(update={"adapter": None, "lora": cfg.model.lora.model_copy(update={"seed": f.seed})})
    dec = load_decoder(mcfg)
    model, tok = dec.model, dec.tokenizer
    model.train()
    records, _ = load_split(cfg.data, "pool")
    examples, stats = tokenize_records(records, tok, cfg.data.max_length, cfg.data.chat_template)
    examples = [e for e in examples if e.n_loss_tokens > 0]

    class _Trainer(Trainer):
        # The per-example mean loss the gradients use, with the LM head only on loss tokens.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = forward_loss(model, inputs, cfg.gradients.loss_reduction)
            return loss.mean()

    out = finetune_dir(cfg)
    work = out.with_name(out.name + ".part")
    shutil.rmtree(work, ignore_errors=True)
    args = TrainingArguments(
        output_dir=str(work / "trainer"), num_train_epochs=f.epochs, learning_rate=f.lr,
        per_device_train_batch_size=f.batch_size, warmup_steps=float(f.warmup_ratio), weight_decay=f.weight_decay,
        lr_scheduler_type="linear", logging_steps=max(1, len(examples) // f.batch_size // 20), save_strategy="no",
        report_to=[], seed=f.seed, data_seed=f.seed, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=not progress, use_cpu=dec.device.type == "cpu",
    )
    trainer = _Trainer(model=model, args=args, train_dataset=_Examples(examples),
                       data_collator=lambda batch: collate(batch, tok.pad_token_id))
    saved: list[dict] = []

    class _Checkpoints(TrainerCallback):
        """Save the adapter at evenly spaced steps with the mean lr since the previous save."""
        def __init__(self):
            self.lrs: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.lrs.append(float(kw["lr_scheduler"].get_last_lr()[0]))  # the lr this step uses

        def on_step_end(self, args, state, control, **kw):
            k = max(1, f.checkpoints)
            marks = {round(state.max_steps * (i + 1) / k) for i in range(k)}
            if state.global_step in marks:
                path = work / "checkpoints" / f"step-{state.global_step}"
                model.save_pretrained(path)
                saved.append({"path": str(out / "checkpoints" / path.name), "step": state.global_step,
                              "lr": sum(self.lrs) / len(self.lrs)})
                self.lrs = []

    if f.checkpoints > 1:
        trainer.add_callback(_Checkpoints())
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_Bar())
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0

    model.eval()
    model.save_pretrained(work / "adapter")
    tok.save_pretrained(work / "adapter")
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    AdamDirection.from_optimizer(lora_modules(model, include_a=True), opt).save(work / "adam.safetensors")
    report = {
        "adapter": str(adapter_path(cfg)), "base_model": cfg.model.name, "examples": len(examples),
        "tokens": stats.n_tokens, "seconds": round(seconds, 1), "train_loss": result.training_loss,
        "log": [h for h in trainer.state.log_history if "loss" in h], "settings": f.model_dump(),
        "lora": mcfg.lora.model_dump(), "checkpoints": saved,
    }
    (work / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work / "trainer", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return report

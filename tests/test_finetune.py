import json

import torch

from influcoder.config import load_config
from influcoder.finetune import adapter_path, finetune, finetune_dir
from influcoder.gradients import lora_modules
from influcoder.models import load_decoder
from influcoder.precondition import AdamDirection


def test_finetune_trains_the_lora_and_saves_adapter_and_adam_state(root, tmp_path, capsys):
    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "finetune.lr=3e-3", "finetune.epochs=2"])
    rep = finetune(cfg, progress=False)
    assert "'loss'" not in capsys.readouterr().out  # no log spam; the curve is in finetune.json
    log = [h["loss"] for h in rep["log"]]
    assert len(log) >= 10 and sum(log[-5:]) / 5 < sum(log[:5]) / 5  # it learns
    saved = json.loads((finetune_dir(cfg) / "finetune.json").read_text())
    assert saved["examples"] == 192 and not (finetune_dir(cfg) / "trainer").exists()
    d = load_decoder(cfg.model.model_copy(update={"adapter": str(adapter_path(cfg))}))
    assert not d.fresh_adapter
    assert max(p.abs().max().item() for n, p in d.model.named_parameters() if "lora_B" in n) > 1e-3
    adam = AdamDirection.load(finetune_dir(cfg) / "adam.safetensors")
    keys = [m.key for m in lora_modules(d.model, include_a=True)]
    assert sorted(adam.m) == sorted(keys) and all(torch.isfinite(v).all() and (v >= 0).all() for v in adam.v.values())


def test_gradients_default_to_the_finetuned_adapter(root, tmp_path):
    import pytest

    from influcoder.gradient_job import run_local
    from influcoder.models import ModelError
    from influcoder.store import GradStore

    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "model.target=finetuned", "data.demo.n=64"])
    with pytest.raises(ModelError, match="Run `influcoder finetune CONFIG`"):
        run_local(cfg, progress=False)
    finetune(cfg, progress=False)
    m = GradStore.open(run_local(cfg, progress=False).store).manifest
    assert m["model"]["target"] == "finetuned" and m["model"]["adapter"]["path"] == str(adapter_path(cfg))
    assert m["a_gradients"] == "included" and len(m["model"]["adapter"]["sha256"]) == 64
    assert any(k.endswith(".A") for k in m["modules"])


def test_finetune_saves_evenly_spaced_checkpoints_with_their_learning_rates(root, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "finetune.lr=3e-3", "finetune.checkpoints=3",
                                                       "data.demo.n=96", "finetune.warmup_ratio=0"])
    rep = finetune(cfg, progress=False)
    ck = rep["checkpoints"]
    assert [c["step"] for c in ck] == [4, 8, 12]  # 96 rows / batch 8 = 12 steps
    lrs = [c["lr"] for c in ck]
    assert lrs[0] > lrs[1] > lrs[2] > 0 and abs(lrs[0] - 3e-3 * (1 - 1.5 / 12)) < 1e-5  # linear decay, mean of steps 0..3
    first, last = (load_file(f"{c['path']}/adapter_model.safetensors") for c in (ck[0], ck[-1]))
    final = load_file(f"{adapter_path(cfg)}/adapter_model.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last checkpoint is the final adapter
    assert any(not torch.equal(first[k], final[k]) for k in final)


def test_gradients_at_an_earlier_checkpoint(root, tmp_path):
    import pytest

    from influcoder.gradient_job import attribution_model
    from influcoder.models import ModelError

    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "model.target=finetuned", "data.demo.n=64",
                                                       "finetune.checkpoints=2", "model.checkpoint=0"])
    finetune(cfg, progress=False)
    assert attribution_model(cfg).adapter == str(finetune_dir(cfg) / "checkpoints" / "step-4")
    last = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": -1})})
    assert attribution_model(last).adapter.endswith("step-8")
    bad = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": 2})})
    with pytest.raises(ModelError, match="saved 2 checkpoints"):
        attribution_model(bad)

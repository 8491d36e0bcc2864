"""Healing on tiny random models: which parameters train, tying, merge, QLoRA on CPU, distillation, resume,
the NaN guard, best-checkpoint selection, heal.json / manifest, and the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from layerprune.arch import parts
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.healing import HealConfig, get_method, heal
from layerprune.healing.distill import kd_loss_sum
from layerprune.healing.methods import lora_target_regex, probe_bitsandbytes, select_layers
from layerprune.models import load_model

from conftest import FAST, ROWS, make_tiny, save_tiny, tiny_tokenizer

PROBE = torch.tensor([[5, 17, 33, 2, 60, 7, 81, 99, 3, 41, 12, 6]])


class Snap(TrainerCallback):
    """Parameters when training starts and ends, and the final model's logits on PROBE."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits.float().clone()

    def changed(self) -> set[str]:
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def logits_of(path: Path) -> torch.Tensor:
    m = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        return m(input_ids=PROBE).logits.float()


# ------------------------------------------------------------------------------------------------ partial


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gemma2", True)])
def test_partial_trains_exactly_norm_head_and_last_layers(tmp_path, data_file, arch, tied):
    src = save_tiny(tmp_path / "src", arch, tie_word_embeddings=tied)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="partial", layers="last2", data=str(data_file),
             tie_mode="untie", **FAST)
    expected = {n for n in snap.before if n.startswith(("model.norm.", "lm_head.", "model.layers.4.",
                                                          "model.layers.5."))}
    assert "lm_head.weight" in expected
    assert snap.changed() == expected  # everything else is bit-identical
    assert r["method_info"]["untied"] is tied and r["method_info"]["trains_input_embeddings"] is False
    # The saved checkpoint reloads with the trained logits; a tied head comes back untied, embeddings untouched.
    out = load_model(tmp_path / "out", dtype=torch.float32)
    p = parts(out)
    assert not p.tied and out.config.tie_word_embeddings is False
    assert torch.equal(p.embed.weight, snap.before["model.embed_tokens.weight"])
    assert torch.equal(p.head.weight, snap.after["lm_head.weight"])
    with torch.no_grad():
        assert torch.allclose(out(input_ids=PROBE).logits, snap.logits, rtol=0, atol=1e-5)
    src_cfg = json.loads((src / "config.json").read_text())
    assert src_cfg.get("tie_word_embeddings", True) is tied or arch == "gemma2"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_default_partial_keeps_a_tied_model_tied(tmp_path, data_file, arch):
    """Default tie mode "frozen": head and embeddings stay fixed, the last layers and the final norm train; the
    output stays tied and has exactly the pruned model's parameter count."""
    from layerprune.healing.config import TIE_DEFAULT
    from layerprune.models import count_parameters

    assert TIE_DEFAULT == "frozen"
    src = save_tiny(tmp_path / "src", arch, tie_word_embeddings=True)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="partial", layers="last2", data=str(data_file), **FAST)
    expected = {n for n in snap.before if n.startswith(("model.norm.", "model.layers.4.", "model.layers.5."))}
    assert snap.changed() == expected
    info = r["method_info"]
    assert info["tie_mode"] == "frozen" and info["untied"] is False and info["frozen_prefix_layers"] == 4
    out = load_model(tmp_path / "out", dtype=torch.float32)
    assert parts(out).tied and count_parameters(out) == count_parameters(load_model(src))
    assert not (set(out.state_dict()) - set(load_model(src).state_dict()))
    with torch.no_grad():
        assert torch.allclose(out(input_ids=PROBE).logits, snap.logits, rtol=0, atol=1e-5)


def test_tie_mode_head_trains_the_shared_matrix_through_the_head_only(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama", tie_word_embeddings=True)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="partial", layers="last2", data=str(data_file),
             tie_mode="head", **FAST)
    expected = {n for n in snap.before if n.startswith(("model.norm.", "model.embed_tokens.", "model.layers.4.",
                                                          "model.layers.5."))}
    assert snap.changed() == expected
    assert r["method_info"]["frozen_prefix_layers"] == 4  # the lookup is detached: the prefix still runs no_grad
    assert parts(load_model(tmp_path / "out")).tied
    assert r["prefix_cache"]["used"] is False and "embedding" in r["prefix_cache"]["why"]


@pytest.mark.parametrize("mode", ["frozen", "both"])
def test_tie_modes_frozen_and_both(tmp_path, data_file, mode):
    src = save_tiny(tmp_path / "src", "llama", tie_word_embeddings=True)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="partial", layers="last1", data=str(data_file),
             tie_mode=mode, **FAST)
    changed = snap.changed()
    assert ("model.embed_tokens.weight" in changed) is (mode == "both")
    assert r["method_info"]["frozen_prefix_layers"] == (5 if mode == "frozen" else 0)
    assert parts(load_model(tmp_path / "out")).tied


def test_partial_without_untie_trains_the_shared_matrix(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama", tie_word_embeddings=True)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="partial", layers="last1", untie=False,
             data=str(data_file), **FAST)
    assert r["method_info"]["trains_input_embeddings"] is True  # recorded, not silent
    assert "model.embed_tokens.weight" in snap.changed()
    assert parts(load_model(tmp_path / "out")).tied


def test_frozen_prefix_runs_without_autograd():
    model = make_tiny("llama")
    get_method("partial").prepare(model, HealConfig(layers="last2"))
    grad_out: dict[str, bool] = {}

    def hook(name):
        def fn(mod, inp, out):
            t = out[0] if isinstance(out, tuple) else out
            grad_out[name] = t.requires_grad
        return fn

    model.model.embed_tokens.register_forward_hook(hook("embed"))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(hook(f"layer{i}"))
    model.train()
    out = model(input_ids=PROBE, labels=PROBE)
    # No graph (so no stored activations) for the embeddings and the four frozen layers.
    assert grad_out == {"embed": False, "layer0": False, "layer1": False, "layer2": False, "layer3": False,
                        "layer4": True, "layer5": True}
    out.loss.backward()
    assert all(p.grad is None for p in model.model.layers[:4].parameters())
    assert all(p.grad is not None for p in model.model.layers[4:].parameters())


def test_layer_selection():
    assert select_layers("last3", 6) == [3, 4, 5]
    assert select_layers("last1", 6) == [5]
    assert select_layers("lm_head", 6) == [] and select_layers("norm_lmhead", 6) == []
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers("1,3", 6) == [1, 3] and select_layers("2-4", 6) == [2, 3, 4]
    assert select_layers([5, 4], 6) == [4, 5]
    for bad in ("last7", "last0", "6", "first2", "1,1"):
        with pytest.raises(LayerpruneError):
            select_layers(bad, 6)


def test_response_only_loss_equals_transformers_loss(tmp_path):
    """The head runs only at trained positions; the loss must still be transformers' causal-LM loss."""
    from transformers import TrainingArguments

    from layerprune.data.instruct import PadCollator, build_instruct_data
    from layerprune.healing.train import HealTrainer

    model = make_tiny("llama").eval()
    data = build_instruct_data(tiny_tokenizer(), rows=ROWS, val_size=4)
    batch = PadCollator(0)(data.train[:3])
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # masked prompt + padding
    trainer = HealTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                          head=parts(model).head)
    calls = []
    parts(model).head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        reference = model(**batch).loss
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    assert calls[0] == (n_trained, model.config.hidden_size)  # the head saw only the trained positions


# --------------------------------------------------------------------------------------- lora / dora / full


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("gpt2", "lora"), ("llama", "dora")])
def test_lora_trains_only_adapters_and_merge_matches_peft(tmp_path, data_file, arch, method):
    from peft import PeftModel

    src = save_tiny(tmp_path / "src", arch)
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method=method, save_adapter=True, data=str(data_file),
             **FAST)
    changed = snap.changed()
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert r["trainable_params"] == sum(p.numel() for n, p in snap.before.items() if ".lora_" in n)
    merged = logits_of(tmp_path / "out")
    base = load_model(src, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=PROBE).logits
    assert torch.allclose(merged, adapter_logits, rtol=0, atol=1e-4)
    assert torch.allclose(merged, snap.logits, rtol=0, atol=1e-4)
    assert not torch.allclose(merged, logits_of(src), atol=1e-3)  # training did change the model
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # the top level is a plain checkpoint


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "gpt_neox", "phi3"])
def test_lora_targets_are_every_linear_in_the_decoder_layers(arch):
    model = make_tiny(arch)
    regex, names = lora_target_regex(model)
    layer_linears = {id(m) for layer in parts(model).layers for m in layer.modules()
                     if isinstance(m, (torch.nn.Linear, Conv1D))}
    matched = {id(m) for n, m in model.named_modules() if re.fullmatch(regex, n)}
    assert matched == layer_linears and len(matched) >= 2 * len(parts(model).layers)
    assert id(parts(model).head) not in matched


def test_full_trains_every_tensor(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="full", data=str(data_file), **FAST)
    assert snap.changed() == set(snap.before)
    assert r["trainable_params"] == sum(t.numel() for t in snap.before.values())


# ------------------------------------------------------------------------------------------------- qlora


def test_qlora_on_cpu_trains_every_adapter(tmp_path, data_file):
    """A few 4-bit steps on CPU. Runs an evaluation first: bitsandbytes 0.50 then repacks the weights for a
    kernel without autograd and adapters below the top layer would silently stop learning."""
    src = save_tiny(tmp_path / "src", "llama", hidden_size=64, intermediate_size=128)
    try:
        probe_bitsandbytes("cpu")
    except LayerpruneError as e:
        with pytest.raises(LayerpruneError, match="bitsandbytes"):
            heal(src, tmp_path / "out", method="qlora", data="unused", **FAST)
        pytest.skip(f"bitsandbytes cannot run here: {e}")
    snap = Snap()
    r = heal(src, tmp_path / "out", callbacks=[snap], method="qlora", data=str(data_file), eval_before=True,
             **FAST)
    changed = snap.changed()
    lora_b = {n for n in snap.before if ".lora_B." in n}
    assert len(lora_b) == 6 * 7 and lora_b <= changed  # all layers, layer 0 included
    assert all(".lora_" in n for n in changed)
    assert r["val_loss_before"] is not None
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into a full-precision standard checkpoint
    assert torch.isfinite(logits_of(tmp_path / "out")).all()


def test_qlora_without_bitsandbytes_is_one_line(tmp_path, data_file, monkeypatch, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    capsys.readouterr()
    rc = main(["heal", str(src), "--out", str(tmp_path / "out"), "--method", "qlora", "--data", str(data_file)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "bitsandbytes" in err and err.startswith("layerprune: error:")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- distill


def test_kd_loss_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    temp = 2.0
    ps, pt = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
    manual = (pt * (pt.log() - ps.log())).sum() * temp * temp
    assert torch.allclose(kd_loss_sum(s, t, temp), manual, atol=1e-5)
    assert kd_loss_sum(s, s, temp).abs().item() < 1e-6


class Logs(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_distill_optimises_the_teacher_kl(tmp_path, data_file):
    from layerprune.prune import prune_checkpoint

    src = save_tiny(tmp_path / "src", "llama")
    runs = {}
    for name, opts in {"plain": dict(method="partial"),
                       "half": dict(method="distill", teacher=str(src), distill_weight=0.5),
                       "kl": dict(method="distill", teacher=str(src), distill_weight=1.0)}.items():
        runs[name] = Logs()
        heal(src, tmp_path / name, callbacks=[runs[name]], data=str(data_file), **opts, **FAST)
    # Step 1 starts from weights equal to the teacher's: the KL term is zero, so the mixed loss is half the LM
    # loss and the pure KL loss vanishes.
    assert runs["kl"].losses[0] < 1e-4
    assert runs["half"].losses[0] == pytest.approx(0.5 * runs["plain"].losses[0], rel=1e-3)
    # A pruned student (teacher named in its layerprune.json) has a positive KL and is pulled toward it.
    prune_checkpoint(str(src), tmp_path / "pruned", tail=2)
    snap, logs = Snap(), Logs()
    r = heal(tmp_path / "pruned", tmp_path / "out", callbacks=[snap, logs], method="distill", distill_weight=1.0,
             data=str(data_file), **FAST)
    assert logs.losses[0] > 1e-3 and snap.changed()
    assert r["method_info"]["base_method"] == "partial"
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["heal"]["method"] == "distill"


@pytest.mark.parametrize("tied", [False, True])
def test_shared_prefix_distill_equals_plain_and_calls_fewer_teacher_layers(tmp_path, data_file, tied):
    """After removing the last layers, partial's frozen layers are the teacher's own first layers: the teacher
    reuses them. Same losses and weights as the plain path, fewer teacher layer calls."""
    from layerprune.prune import prune_checkpoint

    src = save_tiny(tmp_path / "src", "llama", tie_word_embeddings=tied)
    prune_checkpoint(str(src), tmp_path / "pruned", tail=2)
    mode = "frozen"  # (the default) "head" would train a tied matrix that the prefix reads: no sharing
    res, logs, snaps = {}, {}, {}
    for share in (True, False):
        logs[share], snaps[share] = Logs(), Snap()
        res[share] = heal(tmp_path / "pruned", tmp_path / f"out{share}", callbacks=[logs[share], snaps[share]],
                          method="distill", layers="last2", distill_shared_prefix=share, tie_mode=mode,
                          teacher_cache="off",
                          data=str(data_file), **{**FAST, "max_steps": 3})
    on, off = res[True]["distill_shared_prefix"], res[False]["distill_shared_prefix"]
    assert on["used"] and on["layers"] == 2 and not off["used"]
    assert logs[True].losses == pytest.approx(logs[False].losses, rel=1e-5, abs=1e-7)
    for n, w in snaps[False].after.items():
        assert torch.allclose(snaps[True].after[n], w, atol=1e-6), n
    # 3 steps x 2 micro-batches: the teacher ran 4 of its 6 layers each time instead of all 6.
    assert on["teacher_layer_calls"] == 3 * 2 * 4


def test_shared_prefix_refused_when_the_prefix_differs(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama", tie_word_embeddings=False)
    from layerprune.prune import prune_checkpoint

    prune_checkpoint(str(src), tmp_path / "pruned", remove=[0])  # the student's layer 0 is the teacher's layer 1
    r = heal(tmp_path / "pruned", tmp_path / "out", method="distill", layers="last2", data=str(data_file),
             teacher_cache="off", **FAST)
    assert r["distill_shared_prefix"]["used"] is False and "differ" in r["distill_shared_prefix"]["why"]


# ------------------------------------------------------------------------------------ engine behaviour


class Kill(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise RuntimeError("killed")


@pytest.mark.parametrize("method", ["partial", "lora"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data_file, method):
    src = save_tiny(tmp_path / "src", "llama")
    opts = dict(FAST, method=method, data=str(data_file), max_steps=6, eval_steps=2, lr=3e-3)
    full = heal(src, tmp_path / "a", **opts)
    with pytest.raises(RuntimeError, match="killed"):
        heal(src, tmp_path / "b", callbacks=[Kill(4)], **opts)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(LayerpruneError, match="checkpoint folder exists"):
        heal(src, tmp_path / "b", **opts)
    with pytest.raises(LayerpruneError, match=r"differs in \['lr'\]"):
        heal(src, tmp_path / "b", resume=True, **{**opts, "lr": 1e-3})
    resumed = heal(src, tmp_path / "b", resume=True, **opts)
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 6
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["val_loss_before"] == full["val_loss_before"]
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], abs=1e-6)
    assert not (tmp_path / "b.checkpoints").exists()  # removed after success


class Poison(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))


def test_nan_loss_aborts_with_one_clear_error(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    with pytest.raises(LayerpruneError, match=r"loss became nan at step 1.*aborted"):
        heal(src, tmp_path / "out", callbacks=[Poison()], data=str(data_file), **FAST)
    assert not (tmp_path / "out").exists()


class Sabotage(TrainerCallback):
    """Remember the head at step 2's checkpoint, then wreck it so later evaluations are worse."""

    def __init__(self) -> None:
        self.head_at_2: torch.Tensor | None = None

    def on_save(self, args, state, control, model=None, **kw):
        if state.global_step == 2:
            self.head_at_2 = model.lm_head.weight.detach().clone()

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 3:
            with torch.no_grad():
                model.lm_head.weight.mul_(-20.0)


def test_best_validation_checkpoint_is_saved(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    cb = Sabotage()
    r = heal(src, tmp_path / "out", callbacks=[cb], data=str(data_file),
             **{**FAST, "max_steps": 4, "eval_steps": 2, "lr": 1e-3})
    assert r["best_step"] == 2 and r["val_loss_last_step"] > r["final_val_loss"]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(saved["lm_head.weight"], cb.head_at_2)


def test_heal_json_and_manifest_carry_over(tmp_path, data_file):
    from layerprune.prune import prune_checkpoint

    src = save_tiny(tmp_path / "src", "llama")
    prune_checkpoint(str(src), tmp_path / "pruned", remove=[1, 2])
    r = heal(tmp_path / "pruned", tmp_path / "out", method="partial", layers="last1", data=str(data_file), **FAST)
    pruned = load_model(tmp_path / "pruned")
    p = parts(pruned)
    expected = sum(t.numel() for m in (p.norm, p.head, p.layers[3]) for t in m.parameters())
    assert r["trainable_params"] == expected and r["total_params"] > expected
    heal_json = json.loads((tmp_path / "out" / "heal.json").read_text())
    for key in ("method", "trainable_params", "data_fingerprint", "steps", "final_train_loss", "val_loss_before",
                "final_val_loss", "wall_s", "tokens_per_s", "peak_memory_bytes"):
        assert heal_json[key] is not None, key
    assert heal_json["steps"] == 2 and heal_json["tokens_trained"] > 0 and heal_json["wall_s"] > 0
    manifest = json.loads((tmp_path / "out" / "layerprune.json").read_text())
    source_manifest = json.loads((tmp_path / "pruned" / "layerprune.json").read_text())
    assert manifest["removed_layers"] == source_manifest["removed_layers"] == [1, 2]
    assert manifest["heal"]["data_fingerprint"] == heal_json["data_fingerprint"]
    assert manifest["heal"]["layers"] == [3]


def test_refuses_existing_output_and_bad_options(tmp_path, data_file):
    src = save_tiny(tmp_path / "src", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(LayerpruneError, match="not empty"):
        heal(src, tmp_path / "out", data=str(data_file), **FAST)
    with pytest.raises(LayerpruneError, match="unknown heal option"):
        heal(src, tmp_path / "o2", learning_rate=1.0)
    with pytest.raises(LayerpruneError, match="unknown heal method"):
        heal(src, tmp_path / "o2", method="adapterhub")
    with pytest.raises(LayerpruneError, match="multiple of the micro-batch"):
        heal(src, tmp_path / "o2", batch_size=6, micro_batch_size=4)


def test_cli_heal(tmp_path, data_file, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    capsys.readouterr()
    base = ["heal", str(src), "--data", str(data_file), "--max-steps", "1", "--batch-size", "2",
            "--micro-batch-size", "2", "--val-size", "4", "--eval-steps", "1", "--warmup-steps", "0",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "out"), "--layers", "last1"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "heal.json").read_text())["method_info"]["layers"] == [5]
    assert main(base + ["--out", str(tmp_path / "o2"), "--layers", "last99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "last99" in err
    assert main(base + ["--out", str(tmp_path / "o3"), "--method", "distill"]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o4"), "--no-packing", "--prefix-cache-gb", "0"]) == 0
    h = json.loads((tmp_path / "o4" / "heal.json").read_text())
    assert not h["packing"]["used"] and h["config"]["prefix_cache_gb"] == 0
    assert main(base + ["--out", str(tmp_path / "o5"), "--prefix-cache-gb", "-1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_report_to_tensorboard_writes_event_files_offline(tmp_path, data_file):
    """The Trainer's TensorBoard integration, offline: event files in OUT/tracking with the run's name."""
    src = save_tiny(tmp_path / "src", "llama")
    r = heal(src, tmp_path / "out", data=str(data_file), report_to=["tensorboard"], run_name="cell a", **FAST)
    events = list((tmp_path / "out" / "tracking").rglob("events.out.tfevents.*"))
    assert events and r["config"]["report_to"] == ["tensorboard"]


def test_report_to_refuses_unknown_trackers():
    from layerprune.healing import HealConfig

    with pytest.raises(LayerpruneError, match="report_to"):
        HealConfig(report_to=["nosuch"]).validate()

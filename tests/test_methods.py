"""methods.py: exactly the intended parameters train, DiffFit/LoRA start as the base model, trained
state round-trips with stable keys, strict loading, bf16 frozen weights, DiT-XL shares."""
import pytest
import torch

from defectlab.base import runs
from defectlab.core import dit, methods, model
from defectlab.base.errors import DefectlabError

MICRO = dict(model.TINY_CONFIG, sample_size=16, num_layers=2, num_attention_heads=2)  # 16 tokens, width 64
XL = dict(model.TINY_CONFIG, sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
          num_attention_heads=16, attention_head_dim=72)  # DiT-XL/2 at 256 px (latents 32x32)


def base(seed=0):
    torch.manual_seed(seed)
    return dit.DiT(**MICRO).eval()


def fresh(method=None, seed=0, **kw):
    """A base with 3 defect classes copied from ImageNet rows, prepared for ``method``."""
    t = base(seed)
    methods.set_classes(t, 3, [990, 783, 5])
    if method:
        methods.apply(t, method, lora_rank=4, verbose=False, **kw)
    return t


def run(t, labels=(0, 1, 2)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(labels), 3, 16, 16, generator=g)
    with torch.no_grad():
        return t(x, torch.tensor([3, 400, 999])[: len(labels)], torch.tensor(labels)).sample


def expected(method, names):
    """The selection rules restated independently of methods.py."""
    table = {n for n in names if n.endswith("class_embedder.embedding_table.weight")}
    bias = {n for n in names if n.endswith(".bias")}
    return {"full": set(names),
            "bitfit": bias | table,
            "difffit": bias | table | {n for n in names if ".difffit_gamma_" in n},  # DiT's norms: no affine
            "bias_norm": bias | table | {n for n in names if "norm" in n.rsplit(".", 1)[0]},
            "lora": table | {n for n in names if ".lora_A." in n or ".lora_B." in n},
            "vpt": table | {n for n in names if n.startswith("prompts.")}}[method]


@pytest.mark.parametrize("method", methods.METHODS)
def test_optimizer_steps_change_exactly_the_intended_parameters(method):
    t = fresh(method).train()
    names = [n for n, _ in t.named_parameters()]
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable == expected(method, names)
    assert trainable == set(methods.trainable_state(t))
    before = {n: p.detach().clone() for n, p in t.named_parameters()}
    opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # two steps: LoRA's A only gets a gradient once B has left zero
        x, labels = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0])
        loss = t(x, torch.randint(0, 1000, (4,), generator=g), labels).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in t.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable                                # every frozen tensor is bit-identical
    # softmax ignores a constant added to every key, so to_k.bias has an exactly zero gradient
    assert {n for n in trainable - changed if not n.endswith("attn1.to_k.bias")} == set()
    assert "t_embedder" not in str(changed)


def test_difffit_and_lora_start_as_the_base_model():
    want = run(base(), (990, 783, 5))                          # the base's own ImageNet rows
    for method, kw in (("difffit", {}), ("difffit", {"difffit_blocks": 1}), ("lora", {}), ("bitfit", {})):
        t = fresh(method, **kw)
        assert torch.equal(run(t), want), method               # copied classes + γ=1 / B=0: exact
    t = fresh("difffit", difffit_blocks=1)
    gammas = sorted(n for n, _ in t.named_parameters() if "difffit_gamma" in n)
    assert gammas == ["transformer_blocks.0.difffit_gamma_attn", "transformer_blocks.0.difffit_gamma_ff"]


def test_difffit_gamma_scales_the_branches():
    t = fresh("difffit")
    plain = run(t)
    with torch.no_grad():
        t.transformer_blocks[1].difffit_gamma_ff.fill_(0.0)
    assert not torch.allclose(run(t), plain)


def perturbed(method):
    t = fresh(method)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in t.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return t


# literal names: a checkpoint is loaded by a later process, so keys must not depend on object ids,
# registration order or library defaults we don't pin (peft's adapter name is "default")
STABLE_KEYS = {"full": "transformer_blocks.1.attn1.to_q.weight",
               "bitfit": "transformer_blocks.1.ff.net.2.bias",
               "difffit": "transformer_blocks.1.difffit_gamma_ff",
               "bias_norm": "transformer_blocks.1.norm1.linear.weight",
               "lora": "transformer_blocks.1.attn1.to_out.0.lora_B.default.weight",
               "vpt": "prompts.weight"}


@pytest.mark.parametrize("method", methods.METHODS)
def test_trainable_state_roundtrip(method, tmp_path):
    t = perturbed(method)
    assert STABLE_KEYS[method] in methods.trainable_state(t)
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight" in methods.trainable_state(t)
    runs.save_tensors(tmp_path / "trainable.safetensors", methods.trainable_state(t))
    u = fresh(method)
    assert not torch.equal(run(u), run(t))
    methods.load_trainable_state(u, runs.load_tensors(tmp_path / "trainable.safetensors"))
    assert torch.equal(run(u), run(t))


def test_load_trainable_state_is_strict():
    state = methods.trainable_state(perturbed("lora"))
    with pytest.raises(DefectlabError, match="missing.*unexpected"):
        methods.load_trainable_state(fresh("difffit"), state)
    partial = dict(state)
    partial.pop("transformer_blocks.0.attn1.to_q.lora_A.default.weight")
    with pytest.raises(DefectlabError, match=r"1 missing \['transformer_blocks.0.attn1.to_q.lora_A"):
        methods.load_trainable_state(fresh("lora"), partial)
    other = base()
    methods.set_classes(other, 4, "mean")
    methods.apply(other, "lora", lora_rank=4, verbose=False)
    with pytest.raises(DefectlabError, match="class_embedder.embedding_table.weight has shape"):
        methods.load_trainable_state(other, state)


def test_bad_arguments():
    with pytest.raises(DefectlabError, match="full, bitfit, difffit, bias_norm, lora"):
        methods.apply(base(), "prefix_tuning")
    t = fresh("bitfit")
    assert methods.apply(t, "bitfit", lora_rank=4, verbose=False) is t      # same again: a no-op
    with pytest.raises(DefectlabError, match="already applied"):
        methods.apply(t, "lora")
    with pytest.raises(DefectlabError, match="difffit_blocks"):
        methods.apply(base(), "difffit", difffit_blocks=3)
    with pytest.raises(DefectlabError, match="lora_rank"):
        methods.apply(base(), "lora", lora_rank=0)


def test_summary_is_printed(capsys):
    methods.apply(fresh(), "bitfit")
    line = capsys.readouterr().out.strip()
    assert line.startswith("bitfit: ") and line.endswith("%)") and "/" in line


@pytest.mark.parametrize("method", ["bitfit", "difffit", "lora"])
def test_cast_frozen_bf16_with_autocast(method):
    t = methods.cast_frozen(fresh(method).train())
    for p in t.parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t(torch.randn(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 2])).sample
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in t.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_dit_xl_trainable_shares():
    """Counted on the meta device (no memory); numbers go into the report."""
    shares = {}
    for k, names in ((1000, methods.METHODS), (5, ("bitfit", "difffit", "bias_norm", "lora", "vpt"))):
        for method in names:
            with torch.device("meta"):
                t = dit.DiT(**XL)
                if k != 1000:
                    methods.set_classes(t, k, "mean")
                methods.apply(t, method, verbose=False)
            trainable, total = methods.count(t)
            shares[k, method] = trainable / total
            if (k, method) == (1000, "full"):
                assert total == 749_826_464   # diffusers' XL: 675M + per-block timestep/class copies
    assert 0.395 < shares[1000, "bias_norm"] < 0.41          # the original experiments' ~40%
    assert shares[5, "vpt"] < 0.005                            # VPT: prompts + class tables, < 0.5 %
    assert 0.37 < shares[5, "bias_norm"] < 0.38
    assert shares[5, "bitfit"] < shares[5, "difffit"] < 0.002 and shares[5, "lora"] < 0.01


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_vpt_prompts_change_the_output_and_nothing_else_trains(depth):
    """Prompt tokens join the sequence (the output keeps the image's 16 tokens), move the output,
    and train with the class tables only (+ biases with vpt_bias); bad settings are one line."""
    plain = run(fresh())
    t = fresh("vpt", vpt_tokens=3, vpt_depth=depth)
    assert t.prompts.weight.shape == ((2 if depth == "deep" else 1), 3, 64)
    out = run(t)
    assert out.shape == plain.shape and not torch.allclose(out, plain)
    with torch.no_grad():
        t.prompts.weight.mul_(2)
    assert not torch.allclose(run(t), out)  # the prompts are what moved it
    assert {n for n, p in t.named_parameters() if p.requires_grad and "embedding_table" not in n} == {"prompts.weight"}
    biased = fresh("vpt", vpt_bias=True)
    assert {n for n, p in biased.named_parameters() if p.requires_grad} == expected("bitfit", [
        n for n, _ in biased.named_parameters()]) | {"prompts.weight"}
    with pytest.raises(DefectlabError, match="vpt_tokens must be"):
        fresh("vpt", vpt_tokens=0)
    with pytest.raises(DefectlabError, match="vpt_depth must be"):
        fresh("vpt", vpt_depth="middle")

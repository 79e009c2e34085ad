"Behaviour of the DiT generator (drifting_nb.generator) that the training system and users rely on."
import pytest
import torch
import torch.nn as nn

from drifting_nb.generator import (DiT, DiTBlock, GENERATOR_PRESETS, apply_rope, build_generator, count_params,
                                   generate, rope_1d, swiglu_hidden)
import json
from pathlib import Path

RELEASE_PARAMS = json.loads((Path(__file__).parent / "fixtures" / "release" / "param_counts.json").read_text())


def small(**kw):
    "The training system's small-data generator: S/2 resized for 8x8x1 inputs with 10 classes (2 blocks for speed)."
    return build_generator("S/2", input_size=8, in_channels=1, num_classes=10, depth=2, **kw)


def perturbed(model, std=0.02, seed=0):
    "Stand-in for training: move every parameter (including the zero-initialised ones) a little."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(std * torch.randn(p.shape, generator=g))
    return model


def inputs(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (model.sample_noise(n, g), torch.randint(0, model.num_classes, (n,), generator=g),
            1 + 3 * torch.rand(n, generator=g), model.sample_style(n, g))


@pytest.mark.parametrize("name", ["B/2", "L/2", "B/16", "L/16"])
def test_paper_presets_shapes_and_sizes(name):
    paper = {"B/2": 133e6, "L/2": 463e6, "B/16": 134e6, "L/16": 464e6}[name]
    with torch.device("meta"):
        m = build_generator(name)
        eps = m.sample_noise(2)
        x = m(eps, torch.zeros(2, dtype=torch.long), 1.0, m.sample_style(2))
    latent = name.endswith("/2")
    assert tuple(x.shape) == ((2, 4, 32, 32) if latent else (2, 3, 256, 256)) == tuple(eps.shape)
    assert m.grid ** 2 == 256 and m.num_incontext_tokens == 16 and m.num_style_tokens == 32
    assert abs(count_params(name) / paper - 1) < 0.01
    assert count_params(name) == RELEASE_PARAMS[name]          # the release's own count, to the parameter


def test_meta_count_matches_real_model():
    for name in ("T/2", "digits"):
        assert count_params(name) == sum(p.numel() for p in build_generator(name).parameters())
    assert count_params("S/2", input_size=8, in_channels=1, num_classes=10, depth=2) == \
        sum(p.numel() for p in small().parameters())


def test_swiglu_width_is_the_releases():
    assert (swiglu_hidden(768), swiglu_hidden(1024)) == (2048, 2752)           # 2/3 of 4D, rounded up to 32
    for d in (768, 1024): assert abs(3 * d * swiglu_hidden(d) / (2 * d * 4 * d) - 1) < 0.01


@pytest.mark.parametrize("name,overrides,shape", [("T/2", {}, (2, 4, 32, 32)), ("digits", {}, (2, 1, 8, 8)),
                                                  ("S/2", dict(input_size=8, in_channels=1, num_classes=10, depth=2), (2, 1, 8, 8)),
                                                  ("T/2", dict(input_size=16, in_channels=3, patch_size=4, depth=1), (2, 3, 16, 16))])
def test_small_presets_generate_their_shape(name, overrides, shape):
    m = build_generator(name, **overrides)
    with torch.no_grad(): x = generate(m, torch.tensor([0, 1]), 1.5)
    assert tuple(x.shape) == shape and x.dtype == torch.float32


def test_fresh_block_is_identity():
    blk = DiTBlock(64, 4, swiglu_hidden(64))
    model = small()                                   # initialize_weights zeroes the adaLN layers of the model's blocks
    for b in model.blocks:
        x, c = torch.randn(3, 16 + 16, 384), torch.randn(3, 384)
        with torch.no_grad(): assert torch.equal(b(x, c, (model.rope_cos, model.rope_sin)), x)
    nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)   # once the modulation moves, the block acts
    x, c = torch.randn(2, 8, 64), torch.randn(2, 64)
    with torch.no_grad(): assert not torch.allclose(blk(x, c, rope_1d(16, 8)), x)


def test_output_is_zero_at_init_and_deterministic():
    m = small()
    eps, lab, alpha, st = inputs(m)
    with torch.no_grad(): assert m(eps, lab, alpha, st).abs().max() == 0
    perturbed(m)
    with torch.no_grad():
        assert torch.equal(m(eps, lab, alpha, st), m(eps, lab, alpha, st))
        a = generate(m, lab, alpha, generator=torch.Generator().manual_seed(5))
        b = generate(m, lab, alpha, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        assert torch.equal(generate(m, lab, alpha, noise=eps, style_idx=st), m(eps, lab, alpha, st))


def test_alpha_class_style_and_noise_change_the_output():
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m)
    with torch.no_grad():
        ref = m(eps, lab, alpha, st)
        for other in [m(eps, lab, alpha + 1.0, st), m(eps, lab, 2.5, st), m(eps, (lab + 1) % 10, alpha, st),
                      m(eps, lab, alpha, (st + 1) % 64), m(torch.randn_like(eps), lab, alpha, st)]:
            assert (other - ref).abs().amax(dim=(1, 2, 3)).min() > 1e-5   # every sample changes


def test_samples_are_independent_of_batch_mates():
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m, n=4)
    with torch.no_grad():
        torch.testing.assert_close(m(eps, lab, alpha, st)[:2], m(eps[:2], lab[:2], alpha[:2], st[:2]), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_every_parameter():
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m, n=8)
    m(eps, lab, alpha, st).pow(2).mean().backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, f"no gradient reaches {silent}"


def test_training_from_init_reaches_every_parameter():
    "From the zero-initialised state, a few optimiser steps open the gradient path to every parameter."
    m = small()
    eps, lab, alpha, st = inputs(m, n=8)
    target = torch.randn_like(eps)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    reached = set()
    for step in range(3):
        opt.zero_grad()
        (m(eps, lab, alpha, st) - target).pow(2).mean().backward()
        if step == 0: assert {n for n, p in m.named_parameters() if p.grad.abs().sum() > 0} == \
            {"final_layer.linear.weight", "final_layer.linear.bias"}
        reached |= {n for n, p in m.named_parameters() if p.grad.abs().sum() > 0}
        opt.step()
    assert reached == {n for n, _ in m.named_parameters()}


def test_bf16_autocast():
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m)
    with torch.no_grad(): ref = m(eps, lab, alpha, st)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = m(eps, lab, alpha, st)
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(x.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    x.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())


def test_rmsnorm_computes_in_fp32_and_returns_the_input_dtype():
    "The release's RMSNorm: float32 statistics and gain, the input's dtype out; no 'cannot dispatch' warning in bf16."
    import warnings
    from drifting_nb.generator import RMSNorm
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad(): norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 7
    torch.testing.assert_close(norm(x), nn.functional.rms_norm(x, (16,), norm.weight, 1e-6), rtol=0, atol=0)
    xb = x.bfloat16()
    want = (x.bfloat16().float() * torch.rsqrt(x.bfloat16().float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight).bfloat16()
    m = perturbed(small())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = norm(xb)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(): m(*inputs(m))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_attention_runs_in_fp32_under_autocast():
    m = perturbed(small())
    seen = []
    hook = torch.nn.functional.scaled_dot_product_attention
    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype)); return hook(q, k, v, *a, **kw)
    eps, lab, alpha, st = inputs(m)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(): m(eps, lab, alpha, st)
    finally:
        torch.nn.functional.scaled_dot_product_attention = hook
    assert len(seen) == len(m.blocks) and all(d == (torch.float32,) * 3 for d in seen)


def test_torch_compile_traces_one_graph():
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ref = m(eps, lab, alpha, st)
        torch.testing.assert_close(cm(eps, lab, alpha, st), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(generate(cm, lab, alpha, noise=eps, style_idx=st), ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_roundtrip_rebuilds_the_same_generator():
    m = perturbed(small(num_style_tokens=8, style_codebook_size=16))
    m2 = DiT(**m.config)
    m2.load_state_dict(m.state_dict())
    eps, lab, alpha, st = inputs(m)
    with torch.no_grad(): assert torch.equal(m(eps, lab, alpha, st), m2(eps, lab, alpha, st))


def test_ablation_switches():
    m = perturbed(small(num_incontext_tokens=0, num_style_tokens=0))
    assert m.sample_style(3) is None
    with torch.no_grad(): x = generate(m, torch.tensor([1, 2, 3]), 1.0)
    assert x.shape == (3, 1, 8, 8)
    assert not any("style" in n or "incontext" in n for n, _ in m.named_parameters())


def test_rope_depends_on_offsets_over_the_whole_sequence():
    cos, sin = rope_1d(32, 67)
    q, k = torch.randn(32), torch.randn(32)
    Q, K = apply_rope(q.expand(67, 32), cos, sin), apply_rope(k.expand(67, 32), cos, sin)
    torch.testing.assert_close(Q[0], q)                                         # position 0 is not rotated
    torch.testing.assert_close(Q[1] @ K[20], Q[30] @ K[49])                     # same offset, same score
    assert not torch.allclose(Q[1] @ K[20], Q[1] @ K[21])


def test_bad_inputs_name_the_problem():
    m = small()
    eps, lab, alpha, st = inputs(m)
    cases = [((torch.randn(4, 3, 8, 8), lab, alpha, st), "noise must be"),
             ((eps, lab.float(), alpha, st), "labels must be an integer"),
             ((eps, lab + 10, alpha, st), "labels must lie in"),
             ((eps, lab, torch.ones(3), st), "alpha must be"),
             ((eps, lab, alpha, None), "style_idx [N, 32] is required"),
             ((eps, lab, alpha, st[:, :5]), "style_idx must be an integer tensor"),
             ((eps, lab, alpha, st - 64), "style_idx must lie in")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")): m(*args)
    with pytest.raises(ValueError, match="unknown generator preset"): build_generator("XL/2")
    with pytest.raises(ValueError, match="unknown generator option"): build_generator("T/2", width=3)
    with pytest.raises(ValueError, match="multiple of patch_size"): build_generator("T/2", input_size=9)
    with pytest.raises(ValueError, match="divisible by num_heads"): build_generator("T/2", num_heads=5)
    assert set(GENERATOR_PRESETS) >= {"B/2", "L/2", "B/16", "L/16", "S/2", "T/2", "digits"}


@pytest.mark.parametrize("name", ["B/2", "L/2", "B/16", "L/16"])
def test_swiglu_halves_start_like_the_releases_two_dense_layers(name):
    "The release's gate and value are two Dense layers, each xavier-uniform over (D, hidden): std sqrt(2/(D+hidden))."
    torch.manual_seed(0)
    m = build_generator(name, depth=1, num_classes=10)                # one block at the preset's width is enough
    D = GENERATOR_PRESETS[name]["hidden_size"]
    h = swiglu_hidden(D)
    want = (6 / (D + h)) ** 0.5 / 3 ** 0.5                           # xavier-uniform bound / sqrt(3)
    gate, value = m.blocks[0].mlp.w1.weight.detach().chunk(2, 0)      # [h,D] each
    for half in (gate, value):
        assert abs(half.std().item() / want - 1) < 0.03, (half.std().item(), want)
        assert half.abs().max().item() <= want * 3 ** 0.5 + 1e-7       # uniform within the xavier bound
    assert not m.blocks[0].mlp.w1.bias.any()
    qkv = m.blocks[0].attn.qkv.weight                                 # the fused qkv: one xavier over (D, 3D), as released
    assert abs(qkv.std().item() / (2 / (4 * D)) ** 0.5 - 1) < 0.03


def test_remat_gives_the_same_outputs_and_gradients():
    "remat=True (activation checkpointing) recomputes each block in backward: same numbers, same state_dict keys."
    ref, ck = perturbed(build_generator("digits", depth=2)), build_generator("digits", depth=2, remat=True)
    assert list(ref.state_dict()) == list(ck.state_dict())
    ck.load_state_dict(ref.state_dict())
    ref.train(); ck.train()
    eps, lab, alpha, st = inputs(ref, n=3)
    calls = []
    import torch.utils.checkpoint as tuc
    orig = tuc.checkpoint
    def spy(*a, **kw):
        calls.append(kw.get("use_reentrant")); return orig(*a, **kw)
    import drifting_nb.generator as G
    G.checkpoint = spy
    try:
        out_ref, out_ck = ref(eps, lab, alpha, st), ck(eps, lab, alpha, st)
    finally:
        G.checkpoint = orig
    assert calls == [False] * len(ck.blocks)                          # one checkpoint per block, non-reentrant
    assert torch.equal(out_ref, out_ck)
    target = torch.randn_like(out_ref)
    (out_ref - target).pow(2).mean().backward()
    (out_ck - target).pow(2).mean().backward()
    for (n, p), q in zip(ref.named_parameters(), ck.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):                # bf16 autocast: forward and backward run
        xb = ck(eps, lab, alpha, st)
    assert xb.dtype == torch.bfloat16
    xb.float().pow(2).mean().backward()
    ck.eval()
    calls.clear(); G.checkpoint = spy
    try:
        with torch.no_grad(): ck(eps, lab, alpha, st)                 # eval or no grad: nothing to recompute
    finally:
        G.checkpoint = orig
    assert calls == []


def test_rope_in_bf16_is_an_option_under_autocast():
    "rope_fp32=False builds the RoPE tables in the autocast dtype (the release's bf16 models with attn_fp32 false)."
    m = perturbed(small())
    eps, lab, alpha, st = inputs(m)
    assert m.rope_tables("cpu")[0].dtype == torch.float32
    with torch.no_grad(): r32 = m(eps, lab, alpha, st)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        a = m(eps, lab, alpha, st)
        m.rope_fp32 = False
        cos, sin = m.rope_tables("cpu")
        b = m(eps, lab, alpha, st)
    assert cos.dtype == torch.bfloat16 and not torch.equal(a, b)
    torch.testing.assert_close(b.float(), a.float(), atol=0.05 * a.abs().max().item(), rtol=0)
    with torch.no_grad(): assert torch.equal(m(eps, lab, alpha, st), r32)       # without autocast: float32 RoPE as before
    assert build_generator("T/2", rope_fp32=False).config["rope_fp32"] is False


def test_bf16_rope_tables_round_positions_like_the_release():
    "In bf16 the 272 positions of a latent generator (16 + 256 tokens) collapse to 265 distinct values."
    cos, sin = rope_1d(64, 272, dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == (272, 64)
    assert len(torch.unique(torch.cat([cos, sin], 1), dim=0)) == 265
    c32, s32 = rope_1d(64, 272)
    assert torch.equal(c32, rope_1d(64, 272, dtype=torch.float32)[0]) and len(torch.unique(c32, dim=0)) == 272

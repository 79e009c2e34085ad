"""Write the RoPE-precision fixtures of `tests/test_release.py` (issue 24) with the authors' own JAX code.

The released latent generators (configs/gen/latent_sota_*.yaml) run with `use_bf16: true` and `attn_fp32: false`: the
release then builds the RoPE tables and rotates queries and keys in bfloat16. This script records, from the release's
own functions, what that gives, next to the float32 RoPE of the other configs. Run it with a Python that has JAX/flax
(a separate virtualenv: `pip install "jax[cpu]==0.4.37" "jaxlib==0.4.36" "flax==0.10.4" "numpy<2" einops`):

    python tools/release_rope_fixtures.py PATH_TO_RELEASE tests/fixtures/release

PATH_TO_RELEASE is a checkout of github.com/lambertae/drifting (outside this repository; nothing of it is copied).
Written (all arrays float32; bfloat16 values are exact in float32):

- `rope_bf16.npz`: the RoPE tables cos/sin [272, hd/2] (hd = 16 and 64; rotate-half repeats them) of the release's
  `apply_rope` at float32 and bfloat16, read off by rotating unit vectors; and one attention layer (random perturbed
  weights, 16 + 256 tokens) of the release's `Attention` in three precisions (`f32`: dtype float32; `bf16_ropef32`:
  dtype bfloat16, attn_fp32; `bf16_ropebf16`: dtype bfloat16, attn_fp32 false): its q/k after QK-norm (before RoPE),
  after RoPE, and the output.
- `gen_bf16/`: a tiny generator in the hub's layout (`metadata.json` with `use_bf16: true, attn_fp32: false`,
  `ema_params.msgpack`) and `io.npz`: inputs and the release's outputs at that setting (`out`), at `attn_fp32: true`
  (`out_ropef32`, bf16 model with float32 RoPE and attention) and in float32 (`out_f32`).
"""
import json, sys
from pathlib import Path
import numpy as np

N_TOKENS = 16 + 256                       # in-context tokens + the 16x16 patch grid of every released generator
GEN = dict(input_size=32, in_channels=4, out_channels=4, patch_size=2, hidden_size=32, cond_dim=32, depth=2,
           num_heads=2, num_classes=10, n_cls_tokens=16, noise_classes=8, noise_coords=3, mlp_ratio=4.0,
           use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, use_bf16=True, attn_fp32=False)


def f32(a):
    return np.asarray(np.asarray(a).astype(np.float32))


def rope_tables(apply_rope, jnp, hd: int, dtype):
    "cos, sin [N_TOKENS, hd/2] of the release's apply_rope: rotate x = (1,..,1, 0,..,0) -> (cos[:hd/2], sin[:hd/2])."
    half = hd // 2
    unit = jnp.concatenate([jnp.ones((1, N_TOKENS, 1, half)), jnp.zeros((1, N_TOKENS, 1, half))], -1).astype(dtype)
    r, _ = apply_rope(unit, unit, dtype=dtype)
    return f32(r[0, :, 0, :half]), f32(r[0, :, 0, half:])      # [N_TOKENS, hd/2] each (the layout repeats them twice)


def main(release: str, out: str):
    sys.path.insert(0, str(Path(release).resolve()))
    import jax, jax.numpy as jnp
    from utils import hsdp_util
    hsdp_util.set_global_mesh(1)
    from models.generator import Attention, apply_rope, build_generator_from_config
    sys.path.insert(0, str(Path(__file__).parent))
    from release_fixtures import perturb, write_artifact
    out = Path(out)
    rng = np.random.default_rng(24)
    arrays = {}
    for hd in (16, 64):
        for name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            arrays[f"cos{hd}_{name}"], arrays[f"sin{hd}_{name}"] = rope_tables(apply_rope, jnp, hd, dt)

    dim, heads = 16, 1
    x = rng.standard_normal((1, N_TOKENS, dim)).astype(np.float32)
    arrays["attn/x"] = x
    settings = {"f32": (jnp.float32, True), "bf16_ropef32": (jnp.bfloat16, True), "bf16_ropebf16": (jnp.bfloat16, False)}
    params = None
    for name, (dt, fp32) in settings.items():
        kw = dict(dim=dim, num_heads=heads, qkv_bias=True, qk_norm=True, use_rmsnorm=True, attn_fp32=fp32, dtype=dt)
        att, plain = Attention(use_rope=True, **kw), Attention(use_rope=False, **kw)
        if params is None:
            params = perturb(att.init(jax.random.PRNGKey(0), x)["params"], rng, std=0.1)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
                arrays["attn/p/" + "/".join(p.key for p in path)] = f32(leaf)
        y, (q, k) = att.apply({"params": params}, x, return_qk=True)
        _, (q0, k0) = plain.apply({"params": params}, x, return_qk=True)
        q1, k1 = apply_rope(q0, k0, dtype=jnp.float32 if fp32 else dt)        # the release's function on its own q, k
        assert np.array_equal(f32(q1), f32(q)) and np.array_equal(f32(k1), f32(k))
        arrays.update({f"attn/{name}/q_norm": f32(q0), f"attn/{name}/k_norm": f32(k0), f"attn/{name}/q": f32(q),
                       f"attn/{name}/k": f32(k), f"attn/{name}/out": f32(y)})
        print(name, "q dtype", q.dtype, "out", y.dtype, float(np.abs(f32(y)).max()))
    np.savez_compressed(out / "rope_bf16.npz", **arrays)

    model = build_generator_from_config(GEN)
    B = 2
    xg = rng.standard_normal((B, GEN["input_size"], GEN["input_size"], GEN["in_channels"])).astype(np.float32)
    c = rng.integers(0, GEN["num_classes"], B).astype(np.int32)
    cfg_scale = rng.uniform(1.0, 4.0, B).astype(np.float32)
    noise_labels = rng.integers(0, GEN["noise_classes"], (B, GEN["noise_coords"])).astype(np.int32)
    fwd = lambda m, x, c, s, nl: m.generate_image(x, m.c_cfg_noise_to_cond(c, s, nl))   # x is cast to bf16 by the patch embedding
    gp = perturb(model.init(jax.random.PRNGKey(1), xg, c, cfg_scale, noise_labels, method=fwd)["params"], rng)
    run = lambda cfg: f32(build_generator_from_config(cfg).apply({"params": gp}, xg, c, cfg_scale, noise_labels, method=fwd))
    res = dict(out=run(GEN), out_ropef32=run({**GEN, "attn_fp32": True}),
               out_f32=run({**GEN, "use_bf16": False, "attn_fp32": True}))
    write_artifact(out / "gen_bf16", GEN, gp)
    np.savez_compressed(out / "gen_bf16" / "io.npz", x=xg, c=c, cfg_scale=cfg_scale, noise_labels=noise_labels, **res)
    scale = np.abs(res["out_f32"]).max()
    for k in ("out", "out_ropef32"):
        print("gen", k, "max|.-out_f32|/max|out_f32| =", float(np.abs(res[k] - res["out_f32"]).max() / scale))
    print("gen bf16 RoPE vs f32 RoPE (both bf16 models):", float(np.abs(res["out"] - res["out_ropef32"]).max() / scale))


if __name__ == "__main__":
    main(*sys.argv[1:3])

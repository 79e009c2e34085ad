"""Regenerate the parity fixtures of `tests/test_release.py` from a fetched copy of the authors' release.

Run with a Python that has JAX/flax (`pip install "jax[cpu]==0.4.37" "jaxlib==0.4.36" "flax==0.10.4" "numpy<2" einops`):

    python tools/release_fixtures.py PATH_TO_RELEASE tests/fixtures/release

PATH_TO_RELEASE is a checkout of github.com/lambertae/drifting. Nothing of it is copied: this script imports its
modules from that path, builds small networks of its own classes with random, perturbed weights, and writes
(1) artifacts in the hub's layout (`metadata.json` with `model_config`, `ema_params.msgpack`) and
(2) the inputs it fed them and the outputs its code computed (`io.npz`), all in float32.
"""
import json, sys
from pathlib import Path
import numpy as np

GENERATORS = {   # small configs covering every switch of the release's generator
    "gen_latent": dict(input_size=8, in_channels=4, out_channels=4, patch_size=2, hidden_size=56, cond_dim=56, depth=2,
                       num_heads=4, num_classes=10, n_cls_tokens=4, noise_classes=8, noise_coords=3),
    "gen_pixel": dict(input_size=32, in_channels=3, out_channels=3, patch_size=8, hidden_size=32, cond_dim=32, depth=3,
                      num_heads=2, num_classes=7, n_cls_tokens=2, noise_classes=5, noise_coords=2),
    "gen_plain": dict(input_size=8, in_channels=4, out_channels=4, patch_size=4, hidden_size=32, cond_dim=32, depth=1,
                      num_heads=2, num_classes=6, n_cls_tokens=0, noise_classes=0, noise_coords=1),
    "gen_classic": dict(input_size=8, in_channels=4, out_channels=2, patch_size=2, hidden_size=32, cond_dim=40, depth=2,
                        num_heads=4, num_classes=5, n_cls_tokens=3, noise_classes=4, noise_coords=2,
                        use_swiglu=False, use_rmsnorm=False, use_rope=False, use_qknorm=True),
}
GEN_DEFAULTS = dict(mlp_ratio=4.0, use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                    use_bf16=False, attn_fp32=True)
MAES = {   # (model_config, input HWC)
    "mae_latent": (dict(num_classes=10, in_channels=4, base_channels=4, patch_size=2, layers=[3, 4, 6, 3],
                        input_patch_size=1), (16, 16, 4)),
    "mae_pixel": (dict(num_classes=10, in_channels=3, base_channels=4, patch_size=2, layers=[3, 4, 6, 3],
                       input_patch_size=4), (32, 32, 3)),
}
ACT_KW = dict(patch_mean_size=[2, 4], patch_std_size=[2, 4], use_std=True, use_mean=True, every_k_block=2)
RELEASED_MAES = {   # the released MAE configs (configs/mae/*.yaml): parameter counts only, from shapes (nothing allocated)
    "mae_latent_256": dict(num_classes=1000, in_channels=4, base_channels=256, patch_size=2, layers=[3, 4, 6, 3], input_patch_size=1),
    "mae_latent_640": dict(num_classes=1000, in_channels=4, base_channels=640, patch_size=2, layers=[3, 4, 6, 3], input_patch_size=1),
    "mae_pixel_640": dict(num_classes=1000, in_channels=3, base_channels=640, patch_size=2, layers=[3, 4, 6, 3], input_patch_size=8),
}


def perturb(tree, rng, std=0.05):
    "Random init leaves adaLN-zero and zero-init heads at zero: add noise to every leaf."
    import jax
    return jax.tree.map(lambda a: np.asarray(a, np.float32) + std * rng.standard_normal(a.shape).astype(np.float32), tree)


def write_artifact(out: Path, model_config: dict, params, extra=None):
    from flax import serialization
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model_config=model_config, **(extra or {}))
    (out / "metadata.json").write_text(json.dumps(meta, indent=1))
    (out / "ema_params.msgpack").write_bytes(serialization.msgpack_serialize(params))


def mae_param_counts(out: Path):
    "Parameter counts of the released MAE configs per subtree (encoder, decoder, fc), from jax.eval_shape."
    import jax
    from models.mae_model import MAEResNetJAX
    counts = {}
    for name, cfg in RELEASED_MAES.items():
        model = MAEResNetJAX(**cfg)
        rngs = {k: jax.random.PRNGKey(i) for i, k in enumerate(("params", "masking", "dropout"))}
        shapes = jax.eval_shape(lambda: model.init(rngs, **model.dummy_input()))["params"]
        counts[name] = {k: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(v)) for k, v in shapes.items()}
    (out / "mae_param_counts.json").write_text(json.dumps(dict(configs=RELEASED_MAES, counts=counts), indent=1))
    print("mae param counts", counts)


def main(release: str, out: str):
    sys.path.insert(0, str(Path(release).resolve()))
    import jax, jax.numpy as jnp
    from utils import hsdp_util
    hsdp_util.set_global_mesh(1)
    from models.generator import build_generator_from_config
    from models.mae_model import MAEResNetJAX
    out = Path(out)
    rng = np.random.default_rng(0)
    for name, cfg in GENERATORS.items():
        cfg = {**GEN_DEFAULTS, **cfg}
        model = build_generator_from_config(cfg)
        B, S, C = 3, cfg["input_size"], cfg["in_channels"]
        x = rng.standard_normal((B, S, S, C)).astype(np.float32)
        c = rng.integers(0, cfg["num_classes"], B).astype(np.int32)
        cfg_scale = rng.uniform(1.0, 4.0, B).astype(np.float32)
        noise_labels = rng.integers(0, max(1, cfg["noise_classes"]), (B, max(1, cfg["noise_coords"]))).astype(np.int32)
        fwd = lambda m, x, c, s, nl: m.generate_image(x, m.c_cfg_noise_to_cond(c, s, nl))
        params = model.init(jax.random.PRNGKey(1), x, c, cfg_scale, noise_labels, method=fwd)["params"]
        params = perturb(params, rng)
        y = np.asarray(model.apply({"params": params}, x, c, cfg_scale, noise_labels, method=fwd), np.float32)
        write_artifact(out / name, cfg, params)
        np.savez(out / name / "io.npz", x=x, c=c, cfg_scale=cfg_scale, noise_labels=noise_labels, out=y)
        print(name, "out", y.shape, float(np.abs(y).max()))
    for name, (cfg, hwc) in MAES.items():
        model = MAEResNetJAX(**cfg)
        x = rng.standard_normal((3, *hwc)).astype(np.float32)
        act = lambda m, x: m.get_activations(x, **ACT_KW)
        params = model.init(jax.random.PRNGKey(2), x, method=act)["params"]
        params = perturb(params, rng, std=0.1)
        feats = model.apply({"params": params}, x, method=act)
        write_artifact(out / name, cfg, params)
        np.savez(out / name / "io.npz", x=x, keys=np.array(list(feats)), **{f"act/{k}": np.asarray(v, np.float32) for k, v in feats.items()})
        print(name, len(feats), "keys", list(feats)[:6], "...")
    mae_param_counts(out)


def param_counts(release: str, out: str):
    "Exact parameter counts of the released generator configs (configs/gen/*.yaml, 1000 classes), from shapes only."
    import jax, yaml
    from models.generator import build_generator_from_config
    names = {"latent_sota_B": "B/2", "latent_sota_L": "L/2", "pixel_sota_B": "B/16", "pixel_sota_L": "L/16"}
    counts = {}
    for stem, preset in names.items():
        cfg = yaml.safe_load((Path(release) / "configs" / "gen" / f"{stem}.yaml").read_text())["model"]
        model = build_generator_from_config({**cfg, "num_classes": 1000, "use_bf16": False})
        S = cfg["input_size"]
        args = (np.zeros((1, S, S, cfg["in_channels"]), np.float32), np.zeros(1, np.int32), np.ones(1, np.float32),
                np.zeros((1, cfg["noise_coords"]), np.int32))
        fwd = lambda m, x, c, s, nl: m.generate_image(x, m.c_cfg_noise_to_cond(c, s, nl))
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, method=fwd))
        counts[preset] = int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))
        print(preset, stem, counts[preset])
    (Path(out) / "param_counts.json").write_text(json.dumps(counts, indent=1))


def configs(release: str, out: str):
    "The released training configs (configs/gen/*.yaml, configs/mae/*.yaml) as JSON: the recipes' numbers of record."
    import yaml
    cfgs = {f"{kind}/{f.stem}": yaml.safe_load(f.read_text())
            for kind in ("gen", "mae") for f in sorted((Path(release) / "configs" / kind).glob("*.yaml"))}
    (Path(out) / "configs.json").write_text(json.dumps(cfgs, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    param_counts(*sys.argv[1:3])
    configs(*sys.argv[1:3])

"""Regenerate the ConvNeXt-V2 parity fixture of `tests/test_convnext.py` from a fetched copy of the authors' release.

Run with a Python that has JAX/flax (as for tools/release_fixtures.py) and also torch and transformers (the release's
weight converter reads a PyTorch state dict; a JAX env of the same Python version can borrow them by appending the
site-packages of an env that has them to sys.path, after its own numpy):

    python tools/convnext_fixtures.py PATH_TO_RELEASE tests/fixtures/convnext

PATH_TO_RELEASE is a checkout of github.com/lambertae/drifting. Nothing of it is copied: this script builds a tiny random
transformers ConvNeXt-V2 (perturbed so that GRN and every norm matter), saves it with `save_pretrained` (the layout of
the hub checkpoint `facebook/convnextv2-base-22k-224`), converts it with the release's own converter into the release's
JAX ConvNeXt-V2, and writes the pixels it fed that network (generator outputs in [-1, 1], a little beyond) and every
feature the release's pixel feature path computed from them (`io.npz`, float32).
"""
import sys
from pathlib import Path
import numpy as np

CONFIG = dict(hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 2, 1], num_labels=5)
INPUTS = {"x256": (1, 256), "x64": (2, 64)}        # (batch, side): 256 -> 224 shrinks, 64 -> 224 enlarges
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def tiny_checkpoint(out: Path, seed: int = 0):
    "A random transformers ConvNextV2ForImageClassification, every parameter perturbed, saved like the hub's."
    import torch
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification
    torch.manual_seed(seed)
    model = ConvNextV2ForImageClassification(ConvNextV2Config(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return model


def main(release: str, out: str):
    sys.path.insert(0, str(Path(release).resolve()))
    import jax, jax.numpy as jnp
    from utils import hsdp_util
    hsdp_util.set_global_mesh(1)
    from models import convnext as rc
    out = Path(out)
    model_pt = tiny_checkpoint(out)
    net = rc.ConvNextV2(depths=CONFIG["depths"], dims=CONFIG["hidden_sizes"], num_classes=CONFIG["num_labels"])
    shapes = net.init(jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3)))
    params = rc.convert_weights_to_jax(shapes, model_pt.state_dict(), hf=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (b, side) in INPUTS.items():
        x = rng.uniform(-1.1, 1.1, (b, 3, side, side)).astype(np.float16)    # NCHW, as our generators emit; stored
        x = x.astype(np.float32)                                              # exactly in half the bytes
        # the release's pixel path: postprocess without clip to [0, 1], NHWC, ImageNet mean/std, then get_activations
        h = ((x + 1) / 2).transpose(0, 2, 3, 1)
        h = (h - MEAN) / STD
        feats = net.apply(params, jnp.asarray(h), method=net.get_activations)
        arrays[f"{name}/x"] = x.astype(np.float16)
        arrays[f"{name}/keys"] = np.array(list(feats))
        arrays.update({f"{name}/act/{k}": np.asarray(v, np.float32) for k, v in feats.items()})
        print(name, len(feats), "keys:", {k: tuple(v.shape) for k, v in feats.items()})
    np.savez(out / "io.npz", **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:3])

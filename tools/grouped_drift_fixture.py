"""Write tests/fixtures/per_key_drift.safetensors: the drift of each feature of a small multi-feature problem, computed
one feature per call by drifting_nb as it was before features were batched (commit 18a0c59), so that
tests/test_features.py can check the batched loss against it. Usage:
    mkdir /tmp/old && git archive 18a0c59 drifting_nb | tar -x -C /tmp/old
    python tools/grouped_drift_fixture.py /tmp/old"""
import importlib.util, sys
from pathlib import Path
import torch
from safetensors.torch import save_file

def load_drift(root):
    spec = importlib.util.spec_from_file_location("drift_before", Path(root) / "drifting_nb" / "drift.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

# (locations L, width C, offset): per-location maps, 1x1 statistics, a far-off feature (centred), one of width 1
SHAPES = {"map_a": (16, 8, 0.0), "map_b": (4, 8, 0.0), "mean": (1, 8, 0.0), "far": (1, 8, 300.0), "wide": (4, 16, 0.0),
          "norm": (1, 1, 0.0)}
NC, NNEG, NPOS, NUNC = 3, 8, 10, 4

def inputs(seed=0):
    "Generated [NC*NNEG,L,C] and real [NC*(NPOS+NUNC),L,C] features per key, and CFG weights [NC]."
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for k, (L, C, off) in SHAPES.items():
        feats[f"gen.{k}"] = torch.randn(NC * NNEG, L, C, generator=g) + off
        feats[f"real.{k}"] = 1.1 * torch.randn(NC * (NPOS + NUNC), L, C, generator=g) + 0.3 + off
    feats["unc_weight"] = torch.tensor([0.0, 0.7, 2.5])
    return feats

def problems(f, n_cls, n):
    L, C = f.shape[1:]
    return f.reshape(n_cls, n, L, C).transpose(1, 2).reshape(n_cls * L, n, C)

if __name__ == "__main__":
    drift = load_drift(sys.argv[1])
    t = inputs()
    out = dict(t)
    for k, (L, C, _) in SHAPES.items():
        g, r = t[f"gen.{k}"], t[f"real.{k}"]
        p, u = problems(r[:NC * NPOS], NC, NPOS), problems(r[NC * NPOS:], NC, NUNC)
        w = t["unc_weight"].repeat_interleave(L)[:, None].expand(-1, NUNC)
        for name, kw in (("xy", {}), ("floor6", dict(min_affinity=1e-6))):
            V, info = drift.feature_drift(problems(g, NC, NNEG), p, u, w, **kw)
            out[f"V.{name}.{k}"] = V.contiguous()
            out[f"drift_norm.{name}.{k}"] = info["drift_norm"].float()
    dest = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "per_key_drift.safetensors"
    save_file(out, str(dest))
    print(f"wrote {dest} ({dest.stat().st_size / 1024:.0f} KiB)")

"""Regenerate the loss-parity fixture of `tests/test_release_loss.py` from a fetched copy of the authors' release.

Run with a Python that has JAX (`pip install "jax[cpu]==0.4.37" "numpy<2" einops`):

    python tools/release_loss_fixtures.py PATH_TO_RELEASE [tests/fixtures/release/drift_loss.npz]

PATH_TO_RELEASE is a checkout of github.com/lambertae/drifting. Nothing of it is copied: this script imports the
release's loss from that path, feeds it small random problems and saves, per case, the inputs and what the release's
code computed from them (float32): the loss of every problem, the gradient of the mean loss with respect to the
generated features, the feature scale and each temperature's mean squared force.

The inputs are multiples of 1/128 small enough that every squared distance the release forms in float32
(|x|^2 + |y|^2 - 2 x.y) is exact: its outputs are then the loss of these points and not of their rounding, and a
sample's distance to itself is exactly zero (floored at 1e-8 under the square root, as every distance).
"""
import sys
from pathlib import Path
import numpy as np

# name: (B problems, C_g generated, C_p positives, C_n weighted negatives, S channels, temperatures, weights, offset,
#        spread, coordinate multiplier)
CASES = {
    "three_taus":   (6, 8, 12, 4, 16, (0.02, 0.05, 0.2), "per_problem", 0.0, 1.0, 1.0),
    "tau_0.02":     (4, 8, 8, 4, 8, (0.02,), "constant", 0.0, 1.0, 1.0),
    "tau_0.2":      (4, 8, 8, 4, 8, (0.2,), "constant", 0.0, 1.0, 1.0),
    "weights_mixed": (5, 6, 10, 6, 12, (0.02, 0.05, 0.2), "per_negative", 0.0, 1.0, 1.0),
    "no_negatives": (4, 8, 8, 0, 16, (0.02, 0.05, 0.2), "none", 0.0, 1.0, 1.0),
    "wide_channels": (2, 16, 16, 4, 64, (0.02, 0.05, 0.2), "per_problem", 0.0, 1.0, 1.0),
    "offset_std":   (6, 8, 8, 4, 8, (0.02, 0.05, 0.2), "per_problem", 2.0, 0.25, 1.0),      # offset 8 x spread
    "offset_far":   (4, 8, 8, 4, 4, (0.02, 0.05, 0.2), "per_problem", 4.0, 0.125, 1.0),     # 32 x: ours centres
    "tiny_scale":   (4, 8, 8, 4, 8, (0.02, 0.05, 0.2), "per_problem", 0.0, 1.0, 2.0 ** -14),
}
STEP = 1 / 128          # grid of the coordinates (before the multiplier, a power of two: products stay exact)


def grid(rng, shape, offset, spread, mult):
    "Normal samples around `offset` with std `spread`, rounded to the grid, clipped at 4 std."
    z = np.clip(rng.standard_normal(shape), -4, 4) * spread + offset
    return (np.round(z / STEP) * STEP * mult).astype(np.float32)


def weights(rng, kind, B, C_n):
    "Kernel weights of the negatives: one CFG weight per problem (as the release's train step), per negative, etc."
    if kind == "per_problem":   # w = (alpha - 1)(C_g - 1)/C_n for alpha in [1, 4], alpha = 1 (w = 0) included
        w = rng.uniform(0.0, 5.0, (B, 1)).astype(np.float32); w[0] = 0.0
        return np.repeat(w, C_n, 1)
    if kind == "per_negative": return rng.uniform(0.0, 3.0, (B, C_n)).astype(np.float32)
    if kind == "constant": return np.full((B, C_n), 1.5, np.float32)
    return np.zeros((B, 0), np.float32)


def main(release: str, out: str = "tests/fixtures/release/drift_loss.npz"):
    sys.path.insert(0, str(Path(release).resolve()))
    import jax, jax.numpy as jnp
    from drift_loss import drift_loss
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (B, C_g, C_p, C_n, S, taus, wkind, off, spread, mult) in CASES.items():
        gen = grid(rng, (B, C_g, S), off, spread, mult)
        pos = grid(rng, (B, C_p, S), off + 0.5 * spread, spread, mult)     # the data sit a little apart
        neg = grid(rng, (B, C_n, S), off - 0.5 * spread, 1.5 * spread, mult)
        w = weights(rng, wkind, B, C_n)
        run = lambda g: drift_loss(g, jnp.asarray(pos), jnp.asarray(neg), jnp.ones((B, C_g)), jnp.ones((B, C_p)),
                                   jnp.asarray(w), R_list=taus)
        (loss, info) = run(jnp.asarray(gen))
        grad = jax.grad(lambda g: run(g)[0].mean())(jnp.asarray(gen))
        # the release's own float32 noise: the same problem moved by a grid offset (its maths is translation-free)
        shift = np.float32(STEP * mult * 3)
        moved = lambda g: drift_loss(g, jnp.asarray(pos + shift), jnp.asarray(neg + shift), jnp.ones((B, C_g)),
                                     jnp.ones((B, C_p)), jnp.asarray(w), R_list=taus)[0].mean()
        grad_moved = np.asarray(jax.grad(moved)(jnp.asarray(gen + shift)))
        rec = dict(gen=gen, pos=pos, neg=neg, neg_weight=w, taus=np.asarray(taus, np.float32),
                   loss=np.asarray(loss, np.float32), grad=np.asarray(grad, np.float32),
                   scale=np.asarray(info["scale"], np.float32),
                   loss_R=np.asarray([info[f"loss_{t}"] for t in taus], np.float32))
        arrays.update({f"{name}/{k}": v for k, v in rec.items()})
        noise = np.linalg.norm(grad_moved - rec["grad"]) / np.linalg.norm(rec["grad"])
        print(f"{name:>14}: B={B} C_g={C_g} C_p={C_p} C_n={C_n} S={S} taus={taus} mean loss {rec['loss'].mean():.5f} "
              f"scale {float(rec['scale']):.4g}; the release's own float32 noise (gradient of a translated copy) {noise:.1e}")
    arrays["cases"] = np.array(list(CASES))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({Path(out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    if len(sys.argv) < 2: sys.exit(__doc__)
    main(*sys.argv[1:3])

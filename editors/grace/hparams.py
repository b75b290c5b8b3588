"""GRACE's hyperparameters, with the reference's defaults (EasyEdit `hparams/GRACE/*.yaml`, the
authors' `grace/config/editor/grace.yaml`) where they make sense here."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.hparams import param

EPS_EXPANDS = ("coverage", "moving_average")
VALUE_INITS = ("cold", "warm")

# EasyEdit's Llama-2-7B setting edits block 27 of 32: the default layer is the same fraction of
# the depth (block 25 of SmolLM2-135M's 30, block 3 of a 4-block test model).
DEPTH_FRACTION = 27 / 32


def default_layer(n_layers: int) -> int:
    return min(n_layers - 1, round(DEPTH_FRACTION * n_layers))


@dataclass
class GraceHparams:
    """layer: the block whose MLP output projection (down_proj / c_proj / dense_4h_to_h, found by
    bench.core.layout) the codebook wraps; None: DEPTH_FRACTION of the depth.
    eps: the deferral radius a new entry gets (the reference's `eps`, 1.0; Euclidean distance
    between projection inputs, so its meaning depends on the layer's scale: docs/grace.md).
    eps_expand: how an entry grows when an edit with the same answer lands within eps of it
    (`coverage`: the radius becomes the distance; `moving_average`: the key also moves halfway
    to the new input).
    val_init: a new entry's value before training (`cold`: uniform in [0, 1), seeded; `warm`: the
    projection's own output at the key).
    steps, lr: Adam on the value of the edit's entry (the reference's `n_iter` 50 and `edit_lr` 1.0).
    min_loss: stop once the mean target NLL is below it, checked before each step (the reference
    trains all `steps`: 0; the default 1e-2 stops once P(target) > 0.99, as lora and ft do).
    seed: the cold initial values (entry i is drawn with seed + i)."""

    layer: int | None = param(None, layer="index")
    eps: float = param(1.0, gt=0)
    eps_expand: str = param("coverage", choices=EPS_EXPANDS)
    val_init: str = param("cold", choices=VALUE_INITS)
    steps: int = param(50, ge=0, le=100000)
    lr: float = param(1.0, gt=0)
    min_loss: float = param(1e-2, ge=0)
    seed: int = param(0, ge=0, le=4294967295)

"""Stage 2: diffusion in the RAE latent space (DiT-DH / LightningDiT, transport, samplers, training).

Modules, each one concept: :mod:`.models` (networks, presets), :mod:`.fused` (hand-fused autograd
functions of the adaLN-Zero block), :mod:`.checkpoints` (safe reading, strict loading),
:mod:`.transport` (path, times, loss; t = 0 data, t = 1 noise), :mod:`.samplers` (ODE/SDE solvers
and guidance), :mod:`.official` (official RAE YAML), :mod:`.train` and :mod:`.sample` (runs).
"""

from raebench.stage2.checkpoints import load_stage2_state
from raebench.stage2.models import MODELS, DiTDH, LightningDiT, build_model
from raebench.stage2.samplers import sample
from raebench.stage2.transport import Transport, shift_from_dims, time_shift

__all__ = [
    "MODELS", "DiTDH", "LightningDiT", "build_model", "load_stage2_state",
    "sample", "Transport", "shift_from_dims", "time_shift",
]

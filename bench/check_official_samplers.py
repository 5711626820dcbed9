"""Stage-2 samplers: raebench vs the official RAE transport code, same model, same noise.

    python bench/check_official_samplers.py [--official-src /tmp/rae-official] [--steps 20] [--device cuda]

The official sampler code (``src/stage2/transport/{__init__,transport,integrators,path,utils}.py``,
needs ``torchdiffeq``) is read at run time from a checkout of the official RAE repository, a folder
with those five files, or a bare git mirror, copied into a temporary package and never into
raebench. A tiny random DiT-DH of ours (adaLN and output layers re-initialised so that the velocity
is not zero) is the model for both. The script prints max |ours - official| for

- the SDE sampler (official ``Sampler.sample_sde``, Euler) vs ``euler_maruyama``: every diffusion
  form and last step, shift 1 and 2, torch's global RNG re-seeded before each sampler (both draw the
  step noise from it, in the same order: one ``randn(x.shape)`` per grid step, none in the last step);
  and ``sample_sde(sampling_method="heun")`` vs ``sde-heun`` for three forms and two last steps (without
  a last step the official one returns NaN, ours refuses);
- the ODE sampler with dopri5 (official ``Sampler.sample_ode``, torchdiffeq) vs ``adaptive``, at the
  official default tolerances and at tight ones, plus euler / heun2;
- and the official default diffusion form "SBDM", which returns NaN for this path (ours refuses it);
  the official "constant" form fails (``th.sqrt`` of a float), so it has no reference.

Exit status 1 when a difference exceeds --tol (1e-4 by default).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from raebench.stage2.models import DiTDH
from raebench.stage2.samplers import sample

FILES = ("__init__.py", "transport.py", "integrators.py", "path.py", "utils.py")
TINY = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=[32, 48], depth=[2, 1], num_heads=[2, 2],
            num_classes=10)


def load_official_transport(src: str):
    """The official ``stage2.transport`` package from a checkout, a plain folder, or a bare git mirror."""
    root = Path(src)
    if not root.exists():
        sys.exit(f"official RAE sources not found at {src}; clone the official RAE repository there "
                 "or pass --official-src / set RAE_OFFICIAL_SRC")
    pkg = Path(tempfile.mkdtemp()) / "rae_official_transport"
    pkg.mkdir()
    for f in FILES:
        for cand in (root / "src/stage2/transport" / f, root / f):
            if cand.is_file():
                shutil.copy(cand, pkg / f)
                break
        else:  # a bare mirror: read the file from HEAD
            text = subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:src/stage2/transport/{f}"],
                                  check=True, capture_output=True, text=True).stdout
            (pkg / f).write_text(text)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("rae_official_transport")


def tiny_model(seed: int = 0) -> DiTDH:
    torch.manual_seed(seed)
    model = DiTDH(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # undo the zero init of adaLN / output layers
            p.add_(torch.randn_like(p) * 0.1)  # |v| ~ 0.6, varies with x and t
    return model


class Counted:
    """Wraps model.forward and counts calls (network evaluations)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, y):
        self.calls += 1
        return self.model(x, t, y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-src", default=os.environ.get("RAE_OFFICIAL_SRC", "/tmp/rae-official"),
                    help="official RAE checkout, folder with the transport files, or bare git mirror")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu", help="both draw the SDE noise on the CPU and move it, as officially")
    args = ap.parse_args()
    torch.set_num_threads(1)
    off = load_official_transport(args.official_src)
    dev = torch.device(args.device)
    model = tiny_model().to(dev)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(args.batch, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=gen).to(dev)
    y = torch.randint(0, TINY["num_classes"], (args.batch,), generator=gen).to(dev)
    worst = 0.0

    def report(name: str, ours: torch.Tensor, theirs: torch.Tensor, extra: str = "") -> None:
        nonlocal worst
        d = float((ours - theirs).abs().max())
        worst = max(worst, d)
        print(f"  {name:<44} max|diff| {d:.2e}  (|x| max {float(theirs.abs().max()):.2f}){extra}")

    # ---------------------------------------------------------------- SDE (Euler-Maruyama, stochastic Heun)
    def compare_sde(official_method: str, ours_method: str, forms: tuple, lasts: tuple, seed: int) -> None:
        print(f"SDE, {args.steps} steps: ours {ours_method} vs official sample_sde(sampling_method={official_method!r})")
        for shift in (1.0, 2.0):
            sampler = off.Sampler(off.create_transport("Linear", "velocity", time_dist_shift=shift))
            for form in forms:
                for last in lasts:
                    label = f"{official_method} shift {shift:g} {form:<22} last {str(last):<7}"
                    fn = sampler.sample_sde(sampling_method=official_method, diffusion_form=form, diffusion_norm=1.0,
                                            last_step=last, last_step_size=0.04, num_steps=args.steps)
                    torch.manual_seed(seed)
                    cm = Counted(model)
                    try:
                        with torch.no_grad():
                            theirs = fn(z, cm, y=y)[-1]
                    except Exception as e:  # noqa: BLE001 - report the official failure and go on
                        print(f"  {label} official fails: {type(e).__name__}: {e}")
                        continue
                    torch.manual_seed(seed)
                    co = Counted(model)
                    try:
                        ours = sample(co, z, y, method=ours_method, num_steps=args.steps, shift=shift,
                                      diffusion_form=form, last_step=last, last_step_size=0.04)
                    except ValueError as e:  # e.g. a Heun SDE without a last step, whose grid ends at t = 0
                        print(f"  {label} official finite: {bool(theirs.isfinite().all())}; ours refuses: {e}")
                        continue
                    calls = f"  calls {co.calls}/{cm.calls}" if co.calls != cm.calls else ""
                    report(label, ours, theirs, calls)

    compare_sde("euler", "euler-maruyama", ("sigma", "linear", "constant", "decreasing", "inccreasing-decreasing"),
                ("Mean", "Tweedie", "Euler", None), seed=123)
    for shift in (1.0, 2.0):
        sampler = off.Sampler(off.create_transport("Linear", "velocity", time_dist_shift=shift))
        fn = sampler.sample_sde(sampling_method="euler", diffusion_norm=0.5, num_steps=args.steps)
        torch.manual_seed(5)
        with torch.no_grad():
            theirs = fn(z, model.forward, y=y)[-1]
        print(f"  shift {shift:g} official default diffusion_form SBDM: finite {bool(theirs.isfinite().all())}")
    compare_sde("heun", "sde-heun", ("sigma", "linear", "decreasing"), ("Mean", "Tweedie", None), seed=321)
    worst_sde = worst
    try:
        sample(model, z, y, method="em", num_steps=4, diffusion_form="SBDM")
    except ValueError as e:
        print(f"  ours with diffusion_form='SBDM': ValueError: {e}")

    # ---------------------------------------------------------------- ODE
    worst = 0.0
    print(f"ODE, {args.steps} grid points: ours vs official sample_ode")
    for shift in (1.0, 2.0):
        sampler = off.Sampler(off.create_transport("Linear", "velocity", time_dist_shift=shift))
        for method, ours_m, tol in (("dopri5", "adaptive", (1e-6, 1e-3)), ("dopri5", "adaptive", (1e-9, 1e-7)),
                                    ("euler", "euler", (1e-6, 1e-3)), ("heun2", "heun", (1e-6, 1e-3))):
            fn = sampler.sample_ode(sampling_method=method, num_steps=args.steps, atol=tol[0], rtol=tol[1])
            cm, co = Counted(model), Counted(model)
            with torch.no_grad():
                theirs = fn(z, cm, y=y)[-1]
            ours = sample(co, z, y, method=ours_m, num_steps=args.steps, shift=shift, atol=tol[0], rtol=tol[1])
            label = f"shift {shift:g} {method}" + (f" atol {tol[0]:g} rtol {tol[1]:g}" if ours_m == "adaptive" else "")
            report(label, ours, theirs, f"  calls ours {co.calls} official {cm.calls}")
    print(f"worst: SDE {worst_sde:.2e}, ODE {worst:.2e} (tolerance {args.tol:g})")
    sys.exit(0 if max(worst_sde, worst) <= args.tol else 1)


if __name__ == "__main__":
    main()

"""from_official_config vs the official RAE code on random tiny configurations (a correctness check).

    python bench/check_official_configs.py [--official-src /tmp/rae-official] [--n 40] [--seed 0] [--keep DIR]

For each of ``--n`` random configurations the official code (``src/`` of the official RAE repository:
a checkout, or a bare git mirror read with ``git archive``; copied into a temporary folder at run
time, never into raebench) builds the models, which are saved in the official formats:

- the encoder as a Hugging Face ``Dinov2WithRegistersModel`` folder + ``preprocessor_config.json``
  (random widths, depths, heads, patch 14 or 16, position-table size, layer-norm eps, SwiGLU or
  GELU MLP, mean/std; now and then the official MAEwNorm / SigLIP2wNorm classes instead), the
  decoder as an official ViTMAE-style ``config.json`` + ``model.pt`` (built by the official
  ``stage1.RAE``), ``stat.pt`` (both entries, one of them, or none), now and then a stage-1
  training checkpoint as ``stage_1.ckpt``;
- the stage-2 model (official ``DiTwDDTHead``: random hidden sizes, depths, heads, mlp_ratio,
  qk-norm, SwiGLU, RMSNorm, wo_shift, pos-embed, patch sizes, classes, label dropout; now and then
  the official ``LightningDiT``) as ``{'ema': sd}``, the official training checkpoint or a bare
  state dict, and now and then a smaller AutoGuidance guide;
- an official-style sampling YAML (the layout of ``configs/stage2/sampling/*.yaml``, paths
  ``models/...`` relative to the repository root, or absolute): ODE euler / heun2 / dopri5 or SDE,
  num_steps, CFG or AutoGuidance scale and interval (``t-min`` or ``t_min``), ``null_label``,
  time-shift dim and base, optional keys left out now and then.

The official objects come from the YAML through the official loaders (``instantiate_from_config``,
``stage1.RAE``) and the official ``src/sample_ddp.py`` logic (shift, ``create_transport``,
``Sampler.sample_ode``, doubled batch with the null label, ``forward_with_cfg`` /
``forward_with_autoguidance``, first half kept); raebench's through ``raebench.from_official_config``.
Compared: encode (image size != encoder input size too), decode, ``model(x, t, y)``, the CFG and
AutoGuidance velocities, ``.sample(noise, labels)`` with the YAML's settings and with explicit
options (other method / steps / scale / interval, and cfg_scale 1). Every model is in eval mode.
The official code, the random configurations and their files come from ``official_fuzz.py`` beside this script.

Exit status 1 when a difference exceeds the tolerances (velocities 1e-5; encode, decode and
samples 1e-4) or raebench fails where the official code works. Configurations the official code
itself cannot run are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from official_fuzz import cwd, describe, load_official, random_config, tags, write_repo  # beside this script

TOL_V, TOL_X = 1e-5, 1e-4


# ---------------------------------------------------------------------------------------------
# The official sampling path (src/sample_ddp.py)
# ---------------------------------------------------------------------------------------------


class OfficialRun:
    """The official objects of one YAML: RAE, stage-2 model, guide, and sample_ddp's sampling logic."""

    def __init__(self, off, root: Path, yaml_path: Path) -> None:
        from omegaconf import OmegaConf

        self.off = off
        cfg = OmegaConf.load(yaml_path)
        rae_c, model_c, self.transport_c, self.sampler_c, guidance_c, self.misc, _, _ = off.parse_configs(cfg)
        with cwd(root):
            self.rae = off.instantiate(rae_c).eval()
            self.model = off.instantiate(model_c).eval()
            self.guidance = {} if guidance_c is None else dict(guidance_c)
            gm = self.guidance.get("guidance_model")
            self.guide = off.instantiate(gm).eval() if gm is not None else None
        latent_size = tuple(int(d) for d in self.misc.get("latent_size", (768, 16, 16)))
        shift_dim = self.misc.get("time_dist_shift_dim", math.prod(latent_size))
        self.shift = math.sqrt(shift_dim / self.misc.get("time_dist_shift_base", 4096))
        self.null_label = int(self.misc.get("null_label", int(self.misc.get("num_classes", 1000))))

    def guidance_value(self, key: str, default: float) -> float:
        if key in self.guidance:
            return self.guidance[key]
        return self.guidance.get(key.replace("_", "-"), default)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor, method: str | None = None, num_steps: int | None = None,
               scale: float | None = None, interval: tuple | None = None, nets: tuple | None = None) -> torch.Tensor:
        """sample_ddp's sampling; ``nets`` = (model, guide) runs other networks through the official code."""
        model, guide = (self.model, self.guide) if nets is None else nets
        transport = self.off.create_transport(**self.transport_c["params"], time_dist_shift=self.shift)
        sampler = self.off.Sampler(transport)
        if method is None and self.sampler_c["mode"] == "SDE":
            sample_fn = sampler.sample_sde(**self.sampler_c["params"])
        else:  # explicit options on an SDE config: the ODE sampler with those options alone
            params = {} if self.sampler_c["mode"] == "SDE" else dict(self.sampler_c["params"])
            if method is not None:
                params["sampling_method"] = method
            if num_steps is not None:
                params["num_steps"] = num_steps
            sample_fn = sampler.sample_ode(**params)
        scale = self.guidance.get("scale", 1.0) if scale is None else scale
        t_min, t_max = interval if interval is not None else (self.guidance_value("t_min", 0.0),
                                                              self.guidance_value("t_max", 1.0))
        n = len(z)
        if scale > 1.0:
            z = torch.cat([z, z], 0)
            y = torch.cat([y, torch.full((n,), self.null_label)], 0)
            kw = dict(y=y, cfg_scale=scale, cfg_interval=(t_min, t_max))
            if self.guidance.get("method", "cfg") == "autoguidance":
                kw["additional_model_forward"] = guide.forward
                fn = functools.partial(type(self.model).forward_with_autoguidance, model)
            else:
                fn = functools.partial(type(self.model).forward_with_cfg, model)
        else:
            kw, fn = dict(y=y), model.forward
        torch.manual_seed(123)  # the SDE's step noise comes from the global RNG, on both sides
        out = sample_fn(z, fn, **kw)[-1]
        return out[:n]


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------


def check_one(off, c: dict, seed: int, root: Path) -> tuple[str, dict]:
    """('ok' | 'skip' | 'fail', {quantity: max |diff|}) for one configuration, its files under ``root``."""
    from raebench import from_official_config
    from raebench.stage2.samplers import velocity_fn

    try:
        yaml_path = write_repo(root, c, off, seed)
        ref = OfficialRun(off, root, yaml_path)
    except Exception as e:  # noqa: BLE001 - the official code cannot build this configuration
        return "skip", {"reason": f"official code fails to build: {_first_line(e)}"}
    g = torch.Generator().manual_seed(seed)
    B = c["batch"]
    grid = c["input_size"] // c["enc"]["patch_size"]
    C = c["enc"]["hidden_size"]
    ncls = c["dit"]["num_classes"]
    image = torch.rand(B, 3, *c["image"], generator=g)
    lat = torch.randn(B, C, grid, grid, generator=g)
    x = torch.randn(B, C, grid, grid, generator=g)
    t = torch.tensor([0.05, 0.5, 0.97, 0.3])[:B]
    y = torch.randint(0, ncls, (B,), generator=g)
    noise = torch.randn(B, C, grid, grid, generator=g)
    res: dict = {}
    official: dict = {}
    with torch.no_grad():  # the official outputs first; a failure there is a skip, not a defect
        try:
            official["encode"] = ref.rae.encode(image)
            official["decode"] = ref.rae.decode(lat)
            official["velocity"] = ref.model(x, t, y)
        except Exception as e:  # noqa: BLE001
            return "skip", {"reason": f"official forward fails: {_first_line(e)}"}
        is_ddt = "DDT" in c["dit_target"]
        has_null = ref.model.y_embedder.embedding_table.num_embeddings > ncls
        lo, hi = c["interval"] or (None, None)
        cfg_int = (0.0 if lo is None else lo, 1.0 if hi is None else hi)
        if is_ddt and has_null:
            official["cfg velocity"] = ref.model.forward_with_cfg(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((B,), ncls)]), 2.5, cfg_int)[:B]
        if ref.guide is not None:
            official["AG velocity"] = ref.model.forward_with_autoguidance(x, t, y, 2.0, ref.guide.forward, cfg_int)
        ode = c["method"] or "dopri5" if c["mode"] == "ODE" else "euler"
        runs = {f"sample YAML {c['mode']} {c['method'] or '(default: dopri5)'}": {}}
        other = {"euler": "heun2", "heun2": "euler", "dopri5": "euler"}[ode]
        runs[f"sample {other}, scale 1"] = dict(method=other, num_steps=(c["num_steps"] or 6) + 1, scale=1.0)
        if is_ddt and (has_null or ref.guide is not None):
            runs[f"sample {ode}, scale 2 (0.2, 0.7)"] = dict(method=ode, num_steps=5, scale=2.0, interval=(0.2, 0.7))
        for name, kw in runs.items():
            try:
                official[name] = ref.sample(noise, y, **kw)
            except Exception as e:  # noqa: BLE001
                print(f"    {name}: official fails ({_first_line(e)}); not compared")
                runs[name] = None
    # raebench
    try:
        ours = from_official_config(yaml_path)
        with torch.no_grad():
            tok = ours.tokenizer
            res["encode"] = _diff(tok.encode(image), official["encode"])
            res["decode"] = _diff(tok.decode(lat), official["decode"])
            res["velocity"] = _diff(ours.model(x, t, y), official["velocity"])
            sampler = ours.stage2[1]
            if "cfg velocity" in official:
                v = velocity_fn(ours.model, y, 2.5, cfg_int, null_class=sampler.null_class)(x, t)
                res["cfg velocity"] = _diff(v, official["cfg velocity"])
            if "AG velocity" in official:
                guide = sampler.guide.get() if hasattr(sampler.guide, "get") else sampler.guide
                v = velocity_fn(ours.model, y, 2.0, cfg_int, guide=guide)(x, t)
                res["AG velocity"] = _diff(v, official["AG velocity"])
            names = {"euler": "euler", "heun2": "heun", "dopri5": "adaptive"}
            for name, kw in runs.items():
                if kw is None:
                    continue
                torch.manual_seed(123)
                if not kw:
                    mine = ours.sample(noise, y)
                else:
                    mine = ours.sample(noise, y, num_steps=kw["num_steps"], method=names[kw["method"]],
                                       cfg_scale=kw["scale"], cfg_interval=kw.get("interval"))
                res[name] = _diff(mine, official[name])
                if "dopri5" in name:
                    # dopri5's step-size control turns the two implementations' 1e-7 network differences
                    # into differences of the order of its own error target (atol + rtol |x|, both the
                    # official defaults here): judged relative to it. Then the official sampler driven by
                    # raebench's networks, which must agree to 1e-4: the sampler alone.
                    res[name + RATIO] = res.pop(name) / (1e-6 + 1e-3 * float(official[name].abs().max()))
                    g = sampler.guide.get() if hasattr(sampler.guide, "get") else sampler.guide
                    res[name + ", same nets"] = _diff(mine, ref.sample(noise, y, **kw, nets=(ours.model, g)))
    except Exception as e:  # noqa: BLE001 - raebench fails where the official code works: a defect
        traceback.print_exc(limit=3)
        return "fail", {**res, "error": _first_line(e)}
    bad = any(d > tolerance(k) for k, d in res.items())
    return ("fail" if bad else "ok"), res


RATIO = " (diff / solver error target)"


def tolerance(quantity: str) -> float:
    """1e-5 for velocities, 1e-4 for images, latents and samples; dopri5 with each implementation's
    networks: 10 times the solver's own error target (see check_one)."""
    if quantity.endswith(RATIO):
        return 10.0
    return TOL_V if "velocity" in quantity else TOL_X


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:150] if lines else ''}"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != official {tuple(b.shape)}")
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-src", default=os.environ.get("RAE_OFFICIAL_SRC", "/tmp/rae-official"),
                    help="official RAE checkout or bare git mirror")
    ap.add_argument("--n", type=int, default=40, help="number of random configurations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, nargs="*", help="run only these configuration indices")
    ap.add_argument("--keep", type=Path, help="keep each configuration's files under this folder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    off = load_official(args.official_src)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    worst: dict[str, float] = {}
    counts = {"ok": 0, "skip": 0, "fail": 0}
    covered: collections.Counter = collections.Counter()
    for i in range(args.n):
        c = random_config(random.Random(f"{args.seed}-{i}"))
        if args.only and i not in args.only:
            continue
        print(f"[{i}] {describe(c)}", flush=True)
        root = Path(tempfile.mkdtemp(prefix=f"rae_fuzz_{i}_", dir=args.keep))
        try:
            with contextlib.redirect_stdout(_Quiet()):
                status, res = check_one(off, c, 1000 * args.seed + i, root)
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)
        counts[status] += 1
        if status == "skip":
            print(f"    skipped: {res['reason']}")
            continue
        for k, d in res.items():
            if isinstance(d, float):
                worst[k] = max(worst.get(k, 0.0), d)
        if status == "ok":
            covered.update(tags(c))
        shown = "  ".join(f"{k} {d:.1e}" if isinstance(d, float) else f"{k}: {d}" for k, d in res.items())
        print(f"    {status.upper()}  {shown}", flush=True)
    print(f"\n{counts['ok']} ok, {counts['fail']} failed, {counts['skip']} skipped (official code cannot run them)")
    print("passed configurations with: " + ", ".join(f"{k} {n}" for k, n in sorted(covered.items())))
    for k, d in worst.items():
        print(f"  worst {k:<64} {d:.2e}  (tolerance {tolerance(k):g})")
    sys.exit(1 if counts["fail"] else 0)


class _Quiet(io.StringIO):
    """Swallows the official code's prints (it reports every file it loads)."""

    def write(self, s: str) -> int:
        if s.startswith("    "):  # our own messages inside check_one
            sys.__stdout__.write(s)
        return len(s)

    def flush(self) -> None:
        sys.__stdout__.flush()


if __name__ == "__main__":
    main()

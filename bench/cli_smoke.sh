#!/usr/bin/env bash
# The stage-2 command line end to end on one device, in seconds: synthetic images -> cache-latents ->
# train stage2 (fp32 from the cache, then resumed; bf16 encoding on the fly) -> sample (SDE with CFG, Heun).
#   bash bench/cli_smoke.sh [cuda|cpu]       # exits non-zero at the first failing command
set -euo pipefail
dev="${1:-cuda}"
PY="${PYTHON:-python3}"
w="$(mktemp -d)"
"$PY" - "$w/images" <<'PYEOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for i in range(16):
    d = Path(sys.argv[1]) / f"class_{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
PYEOF
rb() { echo "+ raebench $*"; "$PY" -m raebench "$@"; }
rb cache-latents -t pixels --data "$w/images" -o "$w/cache" -r 8 -b 8 --device "$dev"
common=(train stage2 -p tiny --num-classes 2 -b 8 --device "$dev" --log-every 2)
rb "${common[@]}" --latents "$w/cache" -o "$w/run32" --precision fp32 --max-steps 4
rb "${common[@]}" --latents "$w/cache" -o "$w/run32" --precision fp32 --max-steps 8    # resumes at step 4
rb "${common[@]}" -t pixels --data "$w/images" -r 8 -o "$w/run16" --precision bf16 --max-steps 4
rb sample -c "$w/run32/checkpoints/last.pt" -n 8 --steps 5 --method sde --cfg-scale 2 -b 4 -o "$w/sde.npz" --device "$dev"
rb sample -c "$w/run16/checkpoints/last.pt" -n 8 --steps 5 --method heun -b 8 -o "$w/heun.npz" --device "$dev"
"$PY" -c "import numpy as np, sys; [print(f, np.load(f)['arr_0'].shape, np.load(f)['arr_1'].tolist()) for f in sys.argv[1:]]" "$w/sde.npz" "$w/heun.npz"
echo "cli smoke on $dev: ok"

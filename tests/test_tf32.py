"""TF32 is forbidden for fp32 work and allowed for stage-2 training, set and restored in one place,
also after something used torch's new fp32_precision API (where the legacy flags raise on read)."""

import pytest
import torch

from raebench.tf32 import _new_api, tf32


@pytest.fixture
def cuda_flags(monkeypatch):
    """Pretend CUDA is present (the flags are plain settings on a CPU build) and restore them after."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if not _new_api():
        pytest.skip("this torch has only the legacy TF32 flags")
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_tf32_is_set_inside_and_restored_after(cuda_flags):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    with tf32(False):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        with tf32(True):
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_metric_extractors_and_fp32_tokenizers_run_without_tf32(cuda_flags):
    from raebench.eval_config import _autocast
    from raebench.metrics.extractors import full_fp32

    torch.backends.cuda.matmul.fp32_precision = "tf32"  # a user script set the new API first
    for ctx in (full_fp32(), _autocast(torch.device("cuda"), "fp32")):
        with ctx:
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_lpips_and_dreamsim_networks_run_without_tf32(cuda_flags):
    """The feature extractors ran under full_fp32 but LPIPS' and DreamSim's networks did not, so on
    GPUs their convolutions used PyTorch's default TF32; both now compute in full float32."""
    from raebench.metrics import METRICS
    from raebench.metrics.perceptual import LPIPS, DreamSim

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, a, b):
            seen.append(torch.backends.cudnn.conv.fp32_precision)
            return torch.zeros(a.shape[0])

    torch.backends.cudnn.conv.fp32_precision = "tf32"
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    for cls, name in ((LPIPS, "lpips-vgg"), (DreamSim, "dreamsim")):
        m = cls.__new__(cls)
        m.spec, m.model, m.device = METRICS.get(name), Recorder(), torch.device("cpu")
        m.per_image(x, x)
    assert seen == ["ieee", "ieee"] and torch.backends.cudnn.conv.fp32_precision == "tf32"

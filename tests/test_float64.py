"""Float64 digests and sums on any device: Apple's MPS has no float64 (`.double()` fails there)."""

from __future__ import annotations

import torch

from diffusers_hprune.utils.float64 import float64


class _OnMPS:
    """Stands for a tensor on MPS (this machine has none): `.double()` fails, moving to the CPU works."""

    device = torch.device("mps")

    def __init__(self, values):
        self.values = values

    def detach(self):
        return self

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64.")

    def to(self, device, dtype):
        return self.values.to(device, dtype)


def test_float64_sums_on_the_cpu_where_the_device_has_no_float64():
    values = torch.tensor([1.5, 2.25])
    out = float64(_OnMPS(values))
    assert out.dtype == torch.float64 and out.device.type == "cpu" and float(out.sum()) == 3.75
    assert float64(values).dtype == torch.float64


def test_fingerprints_checksums_and_analysis_sums_use_it(monkeypatch):
    """Every float64 sum of device tensors goes through `float64` (fingerprint, the analysis's error and cosine)."""
    from diffusers_hprune import contributions, toy
    from diffusers_hprune.analysis import ablation

    seen = []

    def spy(t):
        seen.append(t)
        return t.detach().double()

    monkeypatch.setattr(contributions, "float64", spy)
    monkeypatch.setattr(ablation, "float64", spy)
    transformer = toy.load_pipeline("sd3").transformer
    contributions.fingerprint(transformer)
    assert len(seen) == sum(1 for _ in transformer.parameters())
    seen.clear()
    ablation.normalised_error([torch.ones(2)], [torch.zeros(2) + 2])
    ablation._cosine(torch.ones(2, 3), torch.ones(2, 3))
    assert len(seen) == 4

"""FID-3D: the Fréchet distance between features of generated and real volumes.

Only computed when ``evaluation.fid_weights`` names a feature extractor, which is never
downloaded: a TorchScript file mapping ``[N, 1, D, H, W]`` to features, or a MONAI 3D
ResNet state dict (e.g. MedicalNet weights), by path, ``file://`` or ``s3://``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets import ResNet

from ldm_core.config import Config
from ldm_core.errors import LdmError
from ldm_core.measures import FOREGROUND_THRESHOLD

FEATURE_BATCH = 4
"""Volumes the feature extractor sees at once."""


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, F]``.

    The same quantity as ``monai.metrics.FIDMetric`` (float64 means, unbiased covariances,
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``). The trace of the
    matrix square root is taken from the eigenvalues of the symmetric ``S_a^(1/2) S_b
    S_a^(1/2)``, which has the same spectrum as ``S_a S_b`` but stays real and stable when
    the covariances are singular, as they are with fewer samples than features.
    """
    a = features_a.double().flatten(1)
    b = features_b.double().flatten(1)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise LdmError(
            f"FID needs at least 2 feature vectors per set, got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[1] != b.shape[1]:
        raise LdmError(f"FID feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (
        torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
        torch.cov(b.T).reshape(b.shape[1], b.shape[1]),
    )
    eval_a, evec_a = torch.linalg.eigh(cov_a)
    sqrt_a = (evec_a * eval_a.clamp(min=0).sqrt()) @ evec_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    value = diff.dot(diff) + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return float(value.clamp(min=0))


FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _resnet_from_state_dict(state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """A MONAI 3D ResNet (no classifier head) whose shape is read off its state dict.

    Depth (blocks per stage), block type (a ``conv3`` means bottleneck), stage widths,
    input channels, first kernel size and shortcut type are all in the weights. The first
    convolution's stride is not; 2 is what MedicalNet, the usual source of such weights,
    uses. A ``module.`` prefix (DataParallel) is dropped and head weights (``fc``,
    ``conv_seg``) are ignored.
    """
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 5:
        raise LdmError(f"{source}: not a 3D ResNet state dict (no 5-D 'conv1.weight')")
    layers, planes = [], []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise LdmError(f"{source}: not a ResNet state dict (no 'layer{stage}.*' weights)")
        layers.append(max(blocks) + 1)
        planes.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    has_downsample_conv = any(".downsample.0.weight" in k for k in state)
    net = ResNet(
        block="bottleneck" if any(".conv3." in k for k in state) else "basic",
        layers=layers,
        block_inplanes=planes,
        spatial_dims=3,
        n_input_channels=int(conv1.shape[1]),
        conv1_t_size=tuple(int(s) for s in conv1.shape[2:]),
        conv1_t_stride=2,
        shortcut_type="B" if has_downsample_conv else "A",
        feed_forward=False,
        bias_downsample=any(".downsample.0.bias" in k for k in state),
    )
    wanted = net.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise LdmError(f"{source}: ResNet weights incomplete, missing {', '.join(missing[:3])}")
    mismatched = [k for k in wanted if state[k].shape != wanted[k].shape]
    if mismatched:
        raise LdmError(
            f"{source}: ResNet weight {mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, "
            f"expected {tuple(wanted[mismatched[0]].shape)}"
        )
    net.load_state_dict({k: state[k] for k in wanted})

    class _Standardised(torch.nn.Module):
        """MedicalNet saw volumes standardised over their brain voxels; do the same."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = (x > FOREGROUND_THRESHOLD).float()
            count = mask.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1, 1, 1)
            mean = (x * mask).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / count
            var = (((x - mean) * mask) ** 2).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / count
            return self.inner((x - mean) / var.sqrt().clamp(min=1e-6))

    return _Standardised(net)


def load_feature_extractor(uri: str, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Load the FID feature network named by ``evaluation.fid_weights`` (path, file:// or s3://).

    TorchScript archives are tried first (any architecture, its own preprocessing inside);
    otherwise the file must be a state dict of a MONAI 3D ResNet (bare, or under a
    ``state_dict`` key). Nothing is ever fetched from a model hub.
    """
    from ldm_core import storage

    with tempfile.TemporaryDirectory(prefix="ldm-fid-") as tmp:
        if storage.is_remote(uri):
            path = storage.download_file(uri, Path(tmp) / "fid_weights.pt", cfg.storage)
        else:
            path = storage.local_path(uri)
        if not path.is_file():
            raise LdmError(f"evaluation.fid_weights: {uri} not found")
        try:
            module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError):
            module = None
        if module is None:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign file raises many types
                raise LdmError(
                    f"evaluation.fid_weights: {uri} is neither a TorchScript file nor a state dict "
                    f"({type(e).__name__}: {e})"
                ) from None
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise LdmError(
                    f"evaluation.fid_weights: {uri} holds a {type(obj).__name__}, not a state dict"
                )
            module = _resnet_from_state_dict(obj, f"evaluation.fid_weights: {uri}").to(device)
    return module.eval()


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, volumes: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Features ``[N, F]``: the extractor's output, spatially averaged if it is a map."""
    out = []
    for start in range(0, volumes.shape[0], FEATURE_BATCH):
        feats = extractor(volumes[start : start + FEATURE_BATCH].to(device))
        if not isinstance(feats, torch.Tensor):
            raise LdmError(
                f"the FID feature extractor returned {type(feats).__name__}, expected a tensor"
            )
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(2)
        out.append(feats.float().cpu())
    return torch.cat(out)

"""Option records passed whole from the CLI and the API to every step that needs them.

``FetchOptions`` says where checkpoints come from (manifest, cache folder, mirror, offline);
``SpeedOptions`` says how a loaded model is prepared for inference (precision, BN folding,
channels-last, torch.compile) and checks, before anything is downloaded or built, that the
device can run it. Both are frozen: a run's options are recorded as they were given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..errors import PspZooError

if TYPE_CHECKING:  # annotations only: the command line reads these options without torch
    import torch

__all__ = ["FetchOptions", "SpeedOptions", "split_options", "PRECISIONS", "cpu_supports_bf16", "cuda_supports_bf16"]

PRECISIONS = ("fp32", "bf16", "fp16")
ManifestPaths = Union[None, str, Path, Sequence[Union[str, Path]]]


@dataclass(frozen=True)
class FetchOptions:
    """Where checkpoints come from.

    ``manifest``: user manifest file(s) added to the built-in one (default ``$PSP_ZOO_MANIFEST``);
    ``cache_dir``: the checkpoint cache (default ``$PSP_ZOO_HOME`` or torch.hub's folder);
    ``mirror``: a base URL serving the zoo's files under the same paths (default
    ``$PSP_ZOO_MIRROR``); ``offline``: use cached files only (default ``$PSP_ZOO_OFFLINE``);
    ``quiet``: no download progress bar.
    """

    manifest: ManifestPaths = None
    cache_dir: Union[None, str, Path] = None
    mirror: Optional[str] = None
    offline: Optional[bool] = None
    quiet: Optional[bool] = None

    def download_kwargs(self) -> Dict[str, Any]:
        """The keywords of :func:`psp_zoo.download` these options set."""
        return {"manifest": self.manifest, "cache_dir": self.cache_dir, "mirror": self.mirror,
                "offline": self.offline, "quiet": self.quiet}


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 / AMX), so bf16 autocast is a speed-up."""
    import torch  # here, not at the top: the command line reads these options without torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def cuda_supports_bf16(device: Union[str, "torch.device"] = "cuda") -> bool:
    """Whether this GPU computes in bf16 natively (compute capability 8.0 and later: A100, H100...).

    Older GPUs (V100, T4) either fail inside cuDNN on a bf16 convolution or emulate it in fp32,
    so a "bf16" speed there would be neither fast nor what it says.
    """
    import torch

    with torch.cuda.device(torch.device(device)):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


@dataclass(frozen=True)
class SpeedOptions:
    """How a loaded model is prepared for inference (:func:`psp_zoo.optimize`).

    The default is the exact fp32 fast path: BN folded into the convs, channels-last memory
    format, within rounding of the model as loaded. ``precision`` 'bf16' (CUDA, or a CPU with
    native bf16) and 'fp16' (CUDA) autocast, and are not the reference numerics; ``compile``
    runs torch.compile (inductor); ``factorize_head`` computes the PSP bottleneck on the pooled
    pyramid maps instead of their upsampling; ``winograd`` computes the wide 3x3 convs by
    Winograd F(4x4, 3x3) on the CPU in fp32 (both exact up to float rounding).
    """

    precision: str = "fp32"
    compile: bool = False
    fuse_bn: bool = True
    channels_last: bool = True
    factorize_head: bool = True
    winograd: bool = True

    def check(self, device: Union[str, torch.device] = "cpu") -> "SpeedOptions":
        """Refuse an unknown precision, a non-bool switch or a precision ``device`` cannot run."""
        import torch

        device = torch.device(device)
        if self.precision not in PRECISIONS:
            raise PspZooError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        for switch in self.switches():
            value = getattr(self, switch)
            if not isinstance(value, bool):
                raise PspZooError(f"{switch} must be True or False, got {value!r}")
        if device.type == "cpu" and self.precision != "fp32":
            self._check_cpu_precision()
        if device.type == "cuda" and self.precision == "bf16" and not cuda_supports_bf16(device):
            raise PspZooError(f"precision 'bf16' needs a GPU with native bf16 (compute capability 8.0 or "
                              f"later); {device} has none: use 'fp16' or 'fp32' on it")
        return self

    def _check_cpu_precision(self) -> None:
        native_bf16 = cpu_supports_bf16()
        if self.precision == "fp16":
            other = ("'bf16' (this CPU has native bf16) or 'fp32'" if native_bf16
                     else "'fp32' (this CPU has no native bf16)")
            raise PspZooError(f"precision 'fp16' needs a CUDA device; on this CPU use {other}")
        if not native_bf16:
            raise PspZooError("precision 'bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX) or a "
                              "CUDA device; use 'fp32' on this machine")

    @classmethod
    def switches(cls) -> Tuple[str, ...]:
        """The on/off fields, in the order results files list them."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "precision")

    def applied(self, device: Union[str, "torch.device", None] = "cpu") -> Tuple[str, ...]:
        """Names of the switches that take effect on ``device``, as recorded in results files.

        ``winograd`` only acts on the CPU in fp32 (cuDNN picks its own conv algorithms, and the
        tile transforms are not for bf16/fp16), so elsewhere it is not listed.
        """
        names = ("fuse_bn", "channels_last", "factorize_head", "winograd", "compile")
        return tuple(name for name in names if getattr(self, name)
                     and (name != "winograd" or self.winograd_applies(device)))

    def winograd_applies(self, device: Union[str, "torch.device", None] = "cpu") -> bool:
        """Whether the Winograd convs are used for this precision on ``device``."""
        return self.winograd and self.precision == "fp32" and str(device or "cpu").split(":")[0] == "cpu"


def split_options(keywords: Mapping[str, Any], fetch: Optional[FetchOptions] = None,
                  speed: Optional[SpeedOptions] = None) -> Tuple[FetchOptions, SpeedOptions, Dict[str, Any]]:
    """Sort loose keywords into fetch options, speed options and the rest (e.g. test overrides).

    Keywords override the fields of ``fetch`` / ``speed`` when both are given, so
    ``evaluate(name, root, mirror=URL, precision='bf16', mode='slide', ...)`` reads naturally.
    """
    fetch_fields = {f.name for f in dataclasses.fields(FetchOptions)}
    speed_fields = {f.name for f in dataclasses.fields(SpeedOptions)}
    fetch = dataclasses.replace(fetch or FetchOptions(), **{k: v for k, v in keywords.items() if k in fetch_fields})
    speed = dataclasses.replace(speed or SpeedOptions(), **{k: v for k, v in keywords.items() if k in speed_fields})
    rest = {k: v for k, v in keywords.items() if k not in fetch_fields | speed_fields}
    return fetch, speed, rest

"""An exported file's logits against PyTorch's on the same random inputs.

:func:`compare_outputs` is the one measure of "how far is this output from that one" (relative
max difference and argmax agreement), used by the exporter's checks, the selftest, the
benchmarks and the tests.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .runtime import OnnxModel

__all__ = ["MAX_REL_DIFF", "MIN_AGREEMENT", "DEFAULT_SIZE", "Comparison", "VerifyReport", "compare_outputs",
           "verify_sizes", "verify_onnx", "verify_torchscript", "verify_safetensors"]

MAX_REL_DIFF = 1e-4          # max |exported - PyTorch| / max |PyTorch logit|
MIN_AGREEMENT = 0.9999       # share of pixels whose argmax class agrees
DEFAULT_SIZE = (512, 512)    # the example input when neither a size nor a manifest entry is given


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Exported vs PyTorch logits on one random input of ``shape`` (N, C, H, W)."""

    shape: Tuple[int, ...]
    rel_diff: float      # max |exported - PyTorch| / max |PyTorch|
    agreement: float     # share of pixels with the same argmax class
    error: str = ""      # why the exported model gave no comparable output

    @property
    def ok(self) -> bool:
        return not self.error and self.rel_diff <= MAX_REL_DIFF and self.agreement >= MIN_AGREEMENT

    def line(self) -> str:
        size = " x ".join(map(str, self.shape))
        if self.error:
            return f"{size}: FAILED ({self.error})"
        return (f"{size}: max rel diff {self.rel_diff:.2e}, argmax agreement {self.agreement * 100:.4f}%  "
                f"{'ok' if self.ok else 'FAILED'}")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Every comparison of one exported file; ``ok`` when all are within the limits."""

    comparisons: List[Comparison]

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def text(self) -> str:
        limits = f"limits: rel diff <= {MAX_REL_DIFF:g}, agreement >= {MIN_AGREEMENT * 100:g}%"
        return "\n".join([*(c.line() for c in self.comparisons), limits])


def compare_outputs(reference: torch.Tensor, got: torch.Tensor) -> Comparison:
    """How far ``got`` is from ``reference`` (both N x C x H x W logits)."""
    reference, got = reference.detach().float().cpu(), got.detach().float().cpu()
    if got.shape != reference.shape:
        return Comparison(tuple(reference.shape), float("inf"), 0.0,
                          f"output shape {tuple(got.shape)}, expected {tuple(reference.shape)}")
    scale = float(reference.abs().max()) or 1.0
    rel = float((got - reference).abs().max()) / scale
    agreement = float((got.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
    return Comparison(tuple(reference.shape), rel if np.isfinite(rel) else float("inf"), agreement)


def verify_sizes(input_size: Sequence[int], dynamic: bool = True) -> List[Tuple[int, int, int]]:
    """(batch, H, W) inputs to check: the export size and, for a dynamic graph, two more.

    61 x 87 reaches the pyramid pooling at 8 x 11 (not divisible by the scales 2, 3, 6) in a batch
    of 2; 37 x 29 at 5 x 4, smaller than the 6 x 6 pooling grid.
    """
    sizes = [(1, int(input_size[0]), int(input_size[1]))]
    if dynamic:
        sizes += [(2, 61, 87), (1, 37, 29)]
    return sizes


def _verify(runner: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
            sizes: Sequence[Tuple[int, int, int]], seed: int) -> VerifyReport:
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    comparisons = []
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            reference = model(x)
        try:
            got = runner(x)
        except Exception as exc:  # the runtime refused the input: report it as this size's failure
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            comparisons.append(Comparison(tuple(reference.shape), float("inf"), 0.0, first[:200]))
            continue
        comparisons.append(compare_outputs(reference, got))
    return VerifyReport(comparisons)


def verify_onnx(path: Union[str, Path], model: nn.Module, sizes: Optional[Sequence[Tuple[int, int, int]]] = None,
                *, input_size: Optional[Sequence[int]] = None, providers: Optional[Sequence[str]] = None,
                threads: Optional[int] = None, seed: int = 0) -> VerifyReport:
    """Run the ONNX file through onnxruntime and ``model`` through PyTorch on the same random inputs.

    ``sizes``: (batch, H, W) triples; by default the graph's own size for a static graph, else
    :func:`verify_sizes` of ``input_size`` (default 512 x 512). The model is run as given (on the CPU).
    """
    runner = OnnxModel(path, providers=providers, threads=threads)
    if sizes is None:
        static = runner.static_size
        sizes = [(1, *static)] if static else verify_sizes(input_size or DEFAULT_SIZE)
    return _verify(runner, model.cpu(), sizes, seed)


def verify_torchscript(path: Union[str, Path], model: nn.Module,
                       sizes: Optional[Sequence[Tuple[int, int, int]]] = None, *,
                       input_size: Optional[Sequence[int]] = None, seed: int = 0) -> VerifyReport:
    """As :func:`verify_onnx` for a file written by :func:`export_torchscript`.

    ``torch.jit.load`` can run code stored in the file: verify only files you wrote yourself.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        runner = torch.jit.load(str(path), map_location="cpu")
    sizes = verify_sizes(input_size or DEFAULT_SIZE) if sizes is None else sizes
    return _verify(lambda x: runner(x), model.cpu(), sizes, seed)



def verify_safetensors(path: Union[str, Path], model: nn.Module, seed: int = 0) -> VerifyReport:
    """Load the file into a copy of ``model`` with :func:`psp_zoo.load_checkpoint`; compare logits."""
    from ..model.checkpoint import load_checkpoint

    loaded = copy.deepcopy(model).cpu()
    load_checkpoint(loaded, path)
    return _verify(loaded.eval(), model.cpu(), verify_sizes(DEFAULT_SIZE, dynamic=True)[1:], seed)


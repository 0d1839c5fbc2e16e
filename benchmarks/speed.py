"""Speed of psp-zoo's inference paths against the plain eager model, on the same weights.

For each model (R-50-D8, R-101-D8; random weights with calibrated BN statistics: speed does not
depend on the values) every variant is prepared once, warmed up, then timed interleaved:
round r calls every variant once (in an order rotated each round), and a variant's speed-up is
the median over rounds of baseline_time[r] / variant_time[r], so load from other processes on
a shared machine hits both sides of each ratio. Numerics (max relative logit difference,
argmax agreement) are against the eager fp32 output on the same input.

A slide case compares psp_zoo.slide_inference one window at a time (the reference loop, docs/reference.md's grid)
with all windows in one batch.

    python benchmarks/speed.py                      # defaults for the device found
    python benchmarks/speed.py --models r50 --size r50=256x512 --rounds 3 --no-compile
    python benchmarks/speed.py --tiny --out-dir /tmp/speed   # seconds-long smoke run

Writes benchmarks/results/speed_<device>_torch<version>.{csv,json} and prints a ratio table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pandas as pd
import torch
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this script lives in


from psp_zoo import PSPNet, load_checkpoint  # noqa: E402
from psp_zoo.deploy.verify import compare_outputs  # noqa: E402
from psp_zoo.environment import cpu_flags, cpu_name, environment_info, exact_float32  # noqa: E402
from psp_zoo.evaluation.inference import slide_inference  # noqa: E402
from psp_zoo.evaluation.measure import PeakMemory  # noqa: E402
from psp_zoo.files import atomic_write  # noqa: E402
from psp_zoo.hub.options import cuda_supports_bf16  # noqa: E402
from psp_zoo.manifest.loading import get_checkpoint  # noqa: E402
from psp_zoo.model import FactorizedPSPHead  # noqa: E402
from psp_zoo.model.optimization import cpu_supports_bf16, fold_batchnorm, optimize  # noqa: E402
from psp_zoo.model.winograd import use_winograd  # noqa: E402
from psp_zoo.results.records import device_tag  # noqa: E402
from psp_zoo.testing import calibrate_batchnorm  # noqa: E402

MODEL_CONFIGS = {
    "r50": {"depth": 50, "num_classes": 19},
    "r101": {"depth": 101, "num_classes": 19},
    # The widths of the tiny mmseg fixtures (tests/conftest.py): for smoke runs only.
    "tiny-r50": {"depth": 50, "num_classes": 5, "stem_channels": 8, "base_channels": 8,
                 "channels": 16, "aux_channels": 8},
}
# Sizes per device: the Cityscapes whole-image size on CUDA; on a 2-core CPU smaller sizes keep
# the whole default run near ten minutes.
DEFAULT_SIZES = {
    "cuda": {"r50": (1024, 2048), "r101": (1024, 2048)},
    "cpu": {"r50": (512, 1024), "r101": (512, 1024)},
}
# Slide geometry (image H, W; crop; stride): Cityscapes 769x769 models on CUDA, the same grid at
# half scale on CPU (2 x 4 = 8 windows either way).
DEFAULT_SLIDE = {
    "cuda": ((1025, 2049), (769, 769), (513, 513)),
    "cpu": ((513, 1025), (385, 385), (257, 257)),
}
RESIDUAL_SCALE = 0.5  # see random_model()
# The published rows a GPU run is read beside: mmseg's fps (fp32, 1024x2048, one V100) and training memory.
PUBLISHED_ROWS = {"r50": "pspnet_r50-d8_512x1024_40k_cityscapes", "r101": "pspnet_r101-d8_512x1024_40k_cityscapes"}
# name -> optimize() keyword arguments; None is the model exactly as loaded.
WHOLE_VARIANTS: Dict[str, Optional[dict]] = {
    "eager": None,
    # each optimization alone
    "fuse_bn": dict(fuse_bn=True, channels_last=False, factorize_head=False, winograd=False),
    "channels_last": dict(fuse_bn=False, channels_last=True, factorize_head=False, winograd=False),
    "factorize_head": dict(fuse_bn=False, channels_last=False, factorize_head=True, winograd=False),
    "winograd": dict(fuse_bn=False, channels_last=False, factorize_head=False, winograd=True),
    "compile": dict(fuse_bn=False, channels_last=False, compile=True, factorize_head=False, winograd=False),
    "bf16": dict(fuse_bn=False, channels_last=False, precision="bf16", factorize_head=False),
    # combinations; fast_* without a suffix are optimize()'s defaults for that precision
    "fast_fp32_no_winograd": dict(fuse_bn=True, channels_last=True, winograd=False),
    "fast_fp32_plain_head": dict(fuse_bn=True, channels_last=True, factorize_head=False),
    "fast_fp32_nchw": dict(fuse_bn=True, channels_last=False),
    "fast_fp32": dict(fuse_bn=True, channels_last=True),
    "fast_fp32_compile_no_winograd": dict(fuse_bn=True, channels_last=True, compile=True, winograd=False),
    "fast_fp32_compile": dict(fuse_bn=True, channels_last=True, compile=True),
    "fast_bf16": dict(fuse_bn=True, channels_last=True, precision="bf16"),
    "fast_bf16_compile": dict(fuse_bn=True, channels_last=True, precision="bf16", compile=True),
    # CUDA only: one captured CUDA graph replayed per call (no kernel launch overhead)
    "fast_fp32_cuda_graph": dict(fuse_bn=True, channels_last=True, cuda_graph=True),
    "fast_bf16_cuda_graph": dict(fuse_bn=True, channels_last=True, precision="bf16", cuda_graph=True),
}
SLIDE_VARIANTS: Dict[str, Tuple[Optional[dict], bool]] = {  # name -> (optimize kwargs, batched)
    "eager_loop": (None, False),
    "eager_batched": (None, True),
    "fast_fp32_loop": (dict(), False),
    "fast_fp32_batched": (dict(), True),
    "fast_bf16_batched": (dict(precision="bf16"), True),
}


# ----------------------------------------------------------------------------- measurement
class MemoryMeter:
    """Peak memory of one call: CUDA max_memory_allocated, or the CPU peak-RSS rise (VmHWM)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the VmHWM high-water mark
            return "VmHWM-after minus VmRSS-before (/proc/self)"
        except OSError:
            return "unavailable"

    def measure(self, call: Callable[[], object]) -> Optional[float]:
        """MiB above what was in use before the call (None where it cannot be measured)."""
        with PeakMemory(self.device, above_baseline=True) as peak:
            call()
        return peak.bytes / 2**20 if peak.exact else None


def timed(call: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    # synchronize(device): without it torch waits on the current device, and on any other GPU the
    # times would be kernel launch times
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def compare(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """psp_zoo's compare_outputs (the measure the exporter and the selftest use), as result fields."""
    comparison = compare_outputs(ref, out)
    return {"max_rel_diff": comparison.rel_diff, "argmax_agreement": comparison.agreement}


def run_case(calls: Dict[str, Tuple[Callable[[], torch.Tensor], dict]], device: torch.device, rounds: int,
             warmup: int, meter: MemoryMeter, log: Callable[[str], None]) -> List[dict]:
    """Warm up, time interleaved, then measure memory; the first entry of ``calls`` is the baseline."""
    names = list(calls)
    first_call_s, outputs = {}, {}
    for name in names:  # the first call includes compilation where there is any
        first_call_s[name], outputs[name] = timed(calls[name][0], device)
        for _ in range(warmup):
            timed(calls[name][0], device)
        log(f"    prepared {name} (first call {first_call_s[name]:.1f} s)")
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(calls[name][0], device)[0])
        log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    baseline = names[0]
    rows = []
    for name in names:
        options = calls[name][1]
        median_s = statistics.median(times[name])
        ratios = [b / t for b, t in zip(times[baseline], times[name])]
        rows.append({
            "variant": name, "options": _describe(options), "median_ms": median_s * 1e3, "fps": 1.0 / median_s,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "first_call_s": first_call_s[name],
            "compile_s": max(first_call_s[name] - median_s, 0.0) if options.get("compile") else None,
            "peak_mem_mib": _peak_mib(meter.measure(calls[name][0]), options.get("capture_peak_mib")),
            **compare(outputs[name], outputs[baseline]),
        })
    return rows


def _peak_mib(replay: Optional[float], capture: Optional[float]) -> Optional[float]:
    """A call's peak; for a CUDA graph the larger of its replay's and its capture's: the graph's
    memory pool is allocated while capturing, before any replay's baseline is taken."""
    known = [v for v in (replay, capture) if v is not None]
    return max(known) if known else None


# ----------------------------------------------------------------------------- models and variants
def random_image(n: int, height: int, width: int, device: torch.device = torch.device("cpu"),
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Normalized-image-like input: smooth per-image structure plus fine noise.

    White noise has the same global statistics in every image, so the pyramid's 1x1-pooled
    branch would see (and calibrate BN to) almost no variance between images.
    """
    coarse = torch.randn(n, 3, max(height // 16, 1), max(width // 16, 1), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth + 0.3 * torch.randn(n, 3, height, width, generator=generator)).to(device)


def random_model(key: str, device: torch.device, seed: int = 0) -> PSPNet:
    """Random weights conditioned like a trained network, so the numerics columns mean something.

    Fresh BN layers (mean 0, var 1) make folding nearly a no-op and let activations fade until
    every pixel has the same argmax; BN statistics calibrated on random images fix that, but a
    random ResNet whose residual branches are as large as its skip paths is chaotic (a 1e-7
    perturbation grows to 30% of the logits). Trained ResNets have small residual branches, so
    each block's last BN scale is halved (cf. torchvision's ``zero_init_residual``).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PSPNet(**MODEL_CONFIGS[key])
    images = [random_image(8, 64, 128, generator=generator) for _ in range(2)]
    calibrate_batchnorm(model, images, random_affine=False, residual_scale=RESIDUAL_SCALE)
    return model.to(device)


def load_model(key: str, device: torch.device, checkpoints: Dict[str, str]) -> PSPNet:
    """The published weights where ``--checkpoint`` names a file, else random_model()."""
    if key not in checkpoints:
        return random_model(key, device)
    model = PSPNet(**MODEL_CONFIGS[key])
    load_checkpoint(model, checkpoints[key])
    return model.eval().to(device)


def _describe(options: dict) -> str:
    """'eager fp32' for the model as loaded, else what optimize() applied, e.g. 'fp32 fuse_bn channels_last'."""
    flags = [key for key in ("fuse_bn", "channels_last", "factorize_head", "winograd", "compile", "freezing",
                             "cuda_graph") if options.get(key)]
    described = " ".join([options.get("precision", "eager fp32"), *flags])
    return f"{described} slide={options['slide']}" if "slide" in options else described


def _prepared(model: PSPNet, kwargs: Optional[dict]) -> Tuple[Callable, dict]:
    if kwargs is None:
        return model, {}
    net = optimize(model, **{k: v for k, v in kwargs.items() if k != "cuda_graph"})
    return net, net.optimizations


def whole_calls(model: PSPNet, x: torch.Tensor, variants: Dict[str, Optional[dict]]) -> Dict[str, tuple]:
    calls = {}
    for name, kwargs in variants.items():
        net, options = _prepared(model, kwargs)
        if (kwargs or {}).get("cuda_graph"):
            net, capture_bytes = cuda_graphed(net, x)
            options = {**options, "cuda_graph": True, "capture_peak_mib": capture_bytes / 2**20}
        calls[name] = (_no_grad_call(net, x), options)
    return calls


def cuda_graphed(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                 ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(``net`` captured once as a CUDA graph for x's shape, the peak bytes allocated while
    warming up and capturing it: the graph's memory pool). Each call copies its input into the
    static input buffer and replays the graph (the returned logits are the static output buffer).
    The side stream and the capture are on x's device, not on the current one."""
    device = x.device
    with PeakMemory(device, above_baseline=True) as peak:
        static_x = x.clone()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
                net(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=side):
            static_out = net(static_x)

    def replay(t: torch.Tensor) -> torch.Tensor:
        static_x.copy_(t)
        graph.replay()
        return static_out
    return replay, peak.bytes


def slide_calls(model: PSPNet, img: torch.Tensor, crop, stride,
                variants: Dict[str, Tuple[Optional[dict], bool]]) -> Dict[str, tuple]:
    calls = {}
    for name, (kwargs, batched) in variants.items():
        net, options = _prepared(model, kwargs)
        # batch_size=1 is the reference's one-window-at-a-time loop; None stacks every window
        def run(t, net=net, bs=None if batched else 1):
            return slide_inference(net, t, crop, stride, batch_size=bs)

        calls[name] = (_no_grad_call(run, img), {**options, "slide": "batched" if batched else "loop"})
    return calls


def _no_grad_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return fn(x)
    return call


def supported_variants(variants: dict, device: torch.device, allow_compile: bool,
                       log: Callable[[str], None]) -> dict:
    """Drop the variants this device cannot run, saying why."""
    kept = {}
    for name, spec in variants.items():
        kwargs = (spec[0] if isinstance(spec, tuple) else spec) or {}
        if kwargs.get("cuda_graph") and device.type != "cuda":
            log(f"  skipping {name}: CUDA graphs need a CUDA device")
        elif kwargs.get("compile") and not allow_compile:
            log(f"  skipping {name}: --no-compile")
        elif kwargs.get("precision") == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
            log(f"  skipping {name}: this CPU has no native bf16")
        elif kwargs.get("precision") == "bf16" and device.type == "cuda" and not cuda_supports_bf16(device):
            log(f"  skipping {name}: this GPU has no native bf16")
        else:
            kept[name] = spec
    return kept


# ----------------------------------------------------------------------------- environment and output
def environment(device: torch.device, note: str) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {
        "device": str(device), "device_name": name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_supports_bf16(), "cpu_flags": cpu_flags(),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()),  # other processes sharing the machine
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": f"random (seeded), BN statistics calibrated on random images, residual BN scale x{RESIDUAL_SCALE}",
        "note": note,
        "published": published_figures(),
    }


def published_figures() -> Dict[str, dict]:
    """The model zoo's fps and training memory for each benchmarked model (V100, fp32, 1024x2048)."""
    figures = {}
    for key, name in PUBLISHED_ROWS.items():
        published = get_checkpoint(name).published
        figures[key] = {"checkpoint": name, "fps": published.fps, "train_mem_gb": published.mem_gb,
                        "measured_on": "V100, fp32, 1024x2048 (mmseg's benchmark)"}
    return figures


def results_stem(device: torch.device) -> str:
    """speed_cpu_torch<v> or speed_cuda-<gpu>_torch<v>: the recorded files' names (the CPU model is
    in the file's environment, not its name)."""
    env = environment_info(device)
    tag = "cpu" if env["device_kind"] == "cpu" else device_tag(env)
    return f"speed_{tag}_torch{torch.__version__.split('+')[0]}"


def write_results(rows: List[dict], env: dict, out_dir: Path, stem: str) -> Tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for key in ("device_name", "cpu_capability", "torch", "threads", "date"):
        frame[key] = env[key]
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    atomic_write(csv_path, frame.to_csv(index=False))
    atomic_write(json_path, json.dumps({"environment": env, "results": rows}, indent=1))
    return csv_path, json_path


def ratio_table(rows: List[dict]) -> str:
    columns = ["model", "case", "size", "variant", "median_ms", "fps", "speedup", "compile_s",
               "peak_mem_mib", "max_rel_diff", "argmax_agreement"]
    return tabulate([[row.get(c) for c in columns] for row in rows], headers=columns, floatfmt=".4g")


# ----------------------------------------------------------------------------- main
def parse_size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW like 512x1024, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--models", default="r50,r101", help="comma-separated: r50, r101")
    parser.add_argument("--size", action="append", default=[], metavar="MODEL=HxW",
                        help="input size per model (repeatable), e.g. r101=512x1024")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="published weights for a model (repeatable), e.g. "
                             "r50=pspnet_r50-d8_512x1024_40k_cityscapes_....pth; default: random weights")
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(WHOLE_VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="calls after the first (compiling) one")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-slide", action="store_true", help="skip the slide case")
    parser.add_argument("--no-head", action="store_true", help="skip the decode-head-alone case")
    parser.add_argument("--slide-model", default="r50")
    parser.add_argument("--slide-size", type=parse_size, default=None, metavar="HxW")
    parser.add_argument("--slide-crop", type=parse_size, default=None, metavar="HxW")
    parser.add_argument("--slide-stride", type=parse_size, default=None, metavar="HxW")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: the tiny fixture widths at 64x64, 1 round, no warm-up")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.slide_model, args.rounds, args.warmup = "tiny-r50", "tiny-r50", 1, 0
        args.size = args.size or ["tiny-r50=64x64"]
        args.slide_size, args.slide_crop, args.slide_stride = (64, 96), (48, 48), (32, 32)
    return args


def select_device(name: Optional[str]) -> torch.device:
    """The device to benchmark, made the current one before anything else touches CUDA: streams,
    pinned memory, cuDNN handles and the caching allocator otherwise start on GPU 0."""
    device = torch.device(name) if name else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is None or device.type != "cuda":
        return device or torch.device("cpu")
    device = torch.device("cuda", 0 if device.index is None else device.index)  # 'cuda': the first, as at start
    torch.cuda.set_device(device)
    return device


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with exact_float32() as float32:  # fp32 variants are fp32: no TF32 (restored afterwards)
        return _run(args, device, float32)


def _run(args: argparse.Namespace, device: torch.device, float32: dict) -> int:
    kind = "cuda" if device.type == "cuda" else "cpu"
    sizes = {**DEFAULT_SIZES[kind], **dict(_model_size(s) for s in args.size)}
    checkpoints = dict(_model_path(s) for s in args.checkpoint)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    whole = WHOLE_VARIANTS if args.variants is None else {
        n: WHOLE_VARIANTS[n] for n in ["eager", *args.variants.split(",")] if n in WHOLE_VARIANTS}
    whole = supported_variants(whole, device, not args.no_compile, log)
    meter = MemoryMeter(device)
    rows = []
    for key in args.models.split(","):
        height, width = sizes[key]
        log(f"{key} whole {height}x{width}")
        model = load_model(key, device, checkpoints)
        x = random_image(1, height, width, device)
        for row in run_case(whole_calls(model, x, whole), device, args.rounds, args.warmup, meter, log):
            rows.append({"model": key, "case": "whole", "size": f"{height}x{width}", **row})
        del model
    if not args.no_head:
        rows += head_case(args, device, sizes, meter, log)
    if not args.no_slide:
        rows += slide_case(args, device, kind, meter, log)
    note = args.note or (f"{kind} shared with other processes; ratios are medians of interleaved per-round ratios")
    env = environment(device, note)
    env["weights"] = {key: checkpoints.get(key, env["weights"]) for key in {*args.models.split(","), args.slide_model}}
    env["memory_method"] = meter.method + "; CUDA graphs: the larger of replay and capture (the graph's pool)"
    env["float32"] = float32
    csv_path, json_path = write_results(rows, env, args.out_dir, results_stem(device))
    print(ratio_table(rows))
    print(f"{env['device_name']} ({env['cpu_capability']}), torch {env['torch']}, {env['threads']} threads")
    if kind == "cuda":  # the published fps are whole-image 1024x2048 on a V100: comparable to this case only
        published = env["published"].items()
        print("published (V100, fp32): " + ", ".join(f"{key} {fig['fps']} fps" for key, fig in published))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def head_case(args: argparse.Namespace, device: torch.device, sizes: Dict[str, Tuple[int, int]],
              meter: MemoryMeter, log: Callable[[str], None]) -> List[dict]:
    """The PSP decode head alone on the stage-4 map of the first model's input (BN folded in all):
    the plain bottleneck over the upsampled pyramid against FactorizedPSPHead, and FactorizedPSPHead
    with its 3x3 conv by Winograd (CPU only)."""
    key = args.models.split(",")[0]
    height, width = sizes[key]
    model = load_model(key, device, dict(_model_path(s) for s in args.checkpoint))
    head = copy.deepcopy(model.decode_head).eval()
    fold_batchnorm(head)
    for param in head.parameters():
        param.requires_grad_(False)
    features = [None, None, None, torch.randn(1, head.psp_modules[0][1].conv.in_channels, (height + 7) // 8,
                                              (width + 7) // 8, device=device)]
    heads = {"plain_head": head, "factorized": FactorizedPSPHead(head)}
    if device.type == "cpu":
        heads["factorized_winograd"] = FactorizedPSPHead(head)
        use_winograd(heads["factorized_winograd"])
    calls = {name: (_no_grad_call(lambda f, h=h: h(f), features),
                    {"factorize_head": name != "plain_head", "winograd": name.endswith("winograd")})
             for name, h in heads.items()}
    log(f"{key} decode head alone on a {features[3].shape[2]}x{features[3].shape[3]} stage-4 map")
    rows = run_case(calls, device, args.rounds, args.warmup, meter, log)
    return [{"model": key, "case": "head", "size": f"{height}x{width}", **row} for row in rows]


def slide_case(args: argparse.Namespace, device: torch.device, kind: str, meter: MemoryMeter,
               log: Callable[[str], None]) -> List[dict]:
    size, crop, stride = DEFAULT_SLIDE[kind]
    size, crop, stride = args.slide_size or size, args.slide_crop or crop, args.slide_stride or stride
    log(f"{args.slide_model} slide {size[0]}x{size[1]} crop {crop} stride {stride}")
    model = load_model(args.slide_model, device, dict(_model_path(s) for s in args.checkpoint))
    img = random_image(1, *size, device)
    variants = supported_variants(SLIDE_VARIANTS, device, True, log)
    rows = run_case(slide_calls(model, img, crop, stride, variants), device, args.rounds, args.warmup, meter, log)
    geometry = f"{size[0]}x{size[1]} crop {crop[0]}x{crop[1]} stride {stride[0]}x{stride[1]}"
    return [{"model": args.slide_model, "case": "slide", "size": geometry, **row} for row in rows]


def _model_path(text: str) -> Tuple[str, str]:
    key, _, path = text.partition("=")
    return key, path


def _model_size(text: str) -> Tuple[str, Tuple[int, int]]:
    key, _, size = text.partition("=")
    return key, parse_size(size)


if __name__ == "__main__":
    sys.exit(main())

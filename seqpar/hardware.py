"""Hardware profiles (peak FLOP/s, memory, bandwidths) for MFU and the cost models.

    profile = resolve_profile(cfg.cluster.profile, device)     # "auto", a name, or a YAML path
    peak = peak_flops(profile, "bf16")                         # FLOP/s per device, or None
    print(format_mfu(mfu(achieved_flops_per_s_per_device, peak)))   # "41.3%" or "n/a"

Profiles are YAML files (``cluster/profiles/*.yaml``). An unknown peak is ``null`` and stays
None all the way to the step line, which then prints "n/a": a made-up peak would make every MFU
number wrong without anyone noticing. Keys this module does not know are kept in
:attr:`HardwareProfile.extra`, so later tables (all-to-all / P2P bandwidths) need no change here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

#: dtype names of ``peak_tflops``; fp32 means plain FP32 (not TF32 Tensor Cores).
DTYPES: tuple[str, ...] = ("bf16", "fp16", "tf32", "fp32")
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
_NUMBER_KEYS: tuple[str, ...] = ("device_memory_gib", "intra_node_bw_gbps", "inter_node_bw_gbps", "host_memory_gib")
_PROFILES_ENV = "SEQPAR_PROFILES"


@dataclass
class HardwareProfile:
    """One device type. Numbers are per device; None means unknown.

    peak_tflops: dense (non-sparse) peak TFLOP/s per dtype name (bf16, fp16, tf32, fp32);
    device_memory_gib: accelerator memory; intra_node_bw_gbps: NVLink GB/s per direction;
    inter_node_bw_gbps: network GB/s per device (typical, override with measurements);
    host_memory_gib: CPU memory per node; extra: every other key of the file, unchanged;
    description: one line for humans; source: the file it was read from.
    """

    name: str
    peak_tflops: dict[str, float | None]
    device_memory_gib: float | None = None
    intra_node_bw_gbps: float | None = None
    inter_node_bw_gbps: float | None = None
    host_memory_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Finding and loading profile files.


def _search_dirs() -> list[str]:
    """Directories searched for ``NAME.yaml``, first match wins (see :func:`load_profile`)."""
    dirs = []
    env = os.environ.get(_PROFILES_ENV, "")
    dirs.extend(d for d in env.split(os.pathsep) if d)
    # seqpar/ sits in the repo root next to cluster/ (editable install or a checkout on sys.path).
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    dirs.append(os.path.join(os.path.dirname(pkg_dir), "cluster", "profiles"))
    # A wheel that ships the files as package data (seqpar/_profiles) has no repo around it.
    dirs.append(os.path.join(pkg_dir, "_profiles"))
    return [d for d in dirs if os.path.isdir(d)]


def available_profiles() -> list[str]:
    """Names of the profiles found in the search directories, sorted."""
    names = set()
    for d in _search_dirs():
        names.update(f[: -len(".yaml")] for f in os.listdir(d) if f.endswith(".yaml"))
    return sorted(names)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _find(name_or_path: str) -> str:
    if _looks_like_path(name_or_path):
        if not os.path.isfile(name_or_path):
            raise ValueError(f"hardware profile file {name_or_path!r} does not exist")
        return name_or_path
    for d in _search_dirs():
        path = os.path.join(d, name_or_path + ".yaml")
        if os.path.isfile(path):
            return path
    names = ", ".join(available_profiles()) or "none found"
    raise ValueError(
        f"unknown hardware profile {name_or_path!r}; available: {names} "
        f"(or 'auto', or a path to a YAML profile; extra directories via ${_PROFILES_ENV})"
    )


def _number(path: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"hardware profile {path}: {key}={value!r} must be a positive number or null (unknown)")
    return float(value)


def profile_from_dict(data: dict, source: str = "<dict>") -> HardwareProfile:
    """Validate a profile mapping (as read from YAML) and build a :class:`HardwareProfile`."""
    if not isinstance(data, dict):
        raise ValueError(f"hardware profile {source} must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"hardware profile {source}: 'name' must be a non-empty string")
    description = data.pop("description", "") or ""
    if not isinstance(description, str):
        raise ValueError(f"hardware profile {source}: 'description' must be a string")
    peaks_raw = data.pop("peak_tflops", None)
    if not isinstance(peaks_raw, dict):
        raise ValueError(f"hardware profile {source}: 'peak_tflops' must be a mapping of dtype to TFLOP/s (null = unknown)")
    # Missing standard dtypes read as unknown; extra dtypes (fp8, ...) are kept as given.
    peaks = {dt: None for dt in DTYPES}
    for dt, value in peaks_raw.items():
        peaks[str(dt)] = _number(source, f"peak_tflops.{dt}", value)
    numbers = {key: _number(source, key, data.pop(key, None)) for key in _NUMBER_KEYS}
    return HardwareProfile(name=name, peak_tflops=peaks, description=description, extra=data, source=source, **numbers)


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load a hardware profile by name or path.

    Search order for a name (first match wins):
      (a) ``name_or_path`` itself when it is a path (contains a separator or ends in .yaml/.yml);
      (b) ``NAME.yaml`` in each directory of ``$SEQPAR_PROFILES`` (``os.pathsep``-separated);
      (c) ``<repo>/cluster/profiles/NAME.yaml``, the repo being the parent of the ``seqpar``
          package (a checkout or an editable install);
      (d) ``seqpar/_profiles/NAME.yaml`` inside the installed package (a wheel with package data).
    Raises ValueError (one line, listing the available names) when nothing matches or the
    file is invalid.
    """
    path = _find(name_or_path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"hardware profile {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return profile_from_dict(data, source=path)


# ---------------------------------------------------------------------------------------------
# Detection.


def profile_name_for_gpu(device_name: str, total_memory_bytes: int) -> str | None:
    """Pure mapping from a CUDA device name and its memory to a shipped profile name, or None.

    Only SXM parts are mapped where variants differ: H100 PCIe / NVL and H200 NVL have lower
    clocks and peaks, and GH200 modules are not profiled, so they return None (MFU n/a) rather
    than a wrong peak. A100 PCIe shares the SXM compute peaks, so it maps by memory size.
    """
    name = device_name.upper()
    gib = total_memory_bytes / 2**30
    if "GH200" in name:
        return None
    if "A100" in name:
        # Reported totals sit a little under the nominal size (about 39.4 and 79.2 GiB).
        return "A100-40GB" if gib < 60 else "A100-80GB"
    if "H100" in name:
        if "PCIE" in name or "NVL" in name:
            return None
        return "H100-SXM"
    if "H200" in name:
        return None if "NVL" in name else "H200"
    return None


def detect_profile_name(device: Any) -> str | None:
    """The profile name of a torch device: "cpu" for CPU, a GPU profile name, or None when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return profile_name_for_gpu(torch.cuda.get_device_name(device), props.total_memory)
    return None


def resolve_profile(spec: str, device: Any) -> HardwareProfile | None:
    """``cluster.profile`` to a profile: "auto" detects from ``device`` (None when unknown);
    any other value is a name or path for :func:`load_profile` (errors when not found)."""
    if spec == "auto":
        name = detect_profile_name(device)
        return load_profile(name) if name else None
    return load_profile(spec)


# ---------------------------------------------------------------------------------------------
# MFU.


def peak_flops(profile: HardwareProfile | None, dtype: str) -> float | None:
    """Dense peak FLOP/s per device for ``dtype`` (bf16, fp16, tf32, fp32 or torch-style aliases);
    None when the profile or that peak is unknown."""
    if profile is None:
        return None
    key = _DTYPE_ALIASES.get(dtype, dtype)
    tflops = profile.peak_tflops.get(key)
    return None if tflops is None else tflops * 1e12


def mfu(achieved_flops_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.413 = 41.3%), or None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return achieved_flops_per_s_per_device / peak


def format_mfu(x: float | None) -> str:
    """``"41.3%"`` or ``"n/a"`` when unknown."""
    return "n/a" if x is None else f"{100.0 * x:.1f}%"

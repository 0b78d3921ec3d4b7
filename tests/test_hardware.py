"""Hardware profiles: the shipped files load, unknown peaks stay unknown, MFU arithmetic."""

import os

import pytest
import torch

from seqpar.hardware import (
    DTYPES,
    available_profiles,
    detect_profile_name,
    format_mfu,
    load_profile,
    mfu,
    peak_flops,
    profile_from_dict,
    profile_name_for_gpu,
    resolve_profile,
)

SHIPPED = ["A100-40GB", "A100-80GB", "H100-SXM", "H200", "cpu"]
GIB = 2**30


@pytest.mark.parametrize("name", SHIPPED)
def test_each_profile_loads(name):
    prof = load_profile(name)
    assert prof.name == name
    assert set(DTYPES) <= set(prof.peak_tflops)
    # Extra keys are for later consumers (the adaptive-scattering cost model reads the bandwidths,
    # the dry run's MEMO alpha LP reads host_bw_gbps); anything else is a typo.
    consumers = {"alltoall_bw_gbps", "p2p_bw_gbps", "gpus_per_node", "scatter_compute", "host_bw_gbps"}
    assert set(prof.extra) <= consumers, f"unexpected keys in {name}.yaml (a typo?): {set(prof.extra) - consumers}"
    assert os.path.basename(prof.source) == f"{name}.yaml"


def test_available_profiles_lists_the_shipped_files():
    assert set(SHIPPED) <= set(available_profiles())


def test_vendor_peaks_and_memory():
    h100 = load_profile("H100-SXM")
    assert peak_flops(h100, "bf16") == pytest.approx(989.4e12)
    assert peak_flops(h100, "tf32") == pytest.approx(494.7e12)
    assert peak_flops(h100, "fp32") == pytest.approx(66.9e12)
    assert peak_flops(h100, "bfloat16") == peak_flops(h100, "bf16")
    assert load_profile("H200").peak_tflops == h100.peak_tflops
    assert load_profile("H200").device_memory_gib == 141
    for name, mem in (("A100-40GB", 40), ("A100-80GB", 80)):
        a100 = load_profile(name)
        assert a100.peak_tflops == {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
        assert a100.device_memory_gib == mem and a100.intra_node_bw_gbps == 300
    assert h100.intra_node_bw_gbps == 450


def test_cpu_peaks_are_unknown_and_mfu_is_na():
    cpu = load_profile("cpu")
    for dt in DTYPES:
        assert cpu.peak_tflops[dt] is None
        assert peak_flops(cpu, dt) is None
    assert cpu.device_memory_gib is None
    assert mfu(1e12, peak_flops(cpu, "fp32")) is None
    assert format_mfu(mfu(1e12, peak_flops(cpu, "fp32"))) == "n/a"
    assert peak_flops(None, "bf16") is None


def test_mfu_arithmetic():
    peak = peak_flops(load_profile("A100-80GB"), "bf16")
    assert mfu(156e12, peak) == pytest.approx(0.5)
    assert format_mfu(mfu(128.856e12, peak)) == "41.3%"
    assert format_mfu(0.0) == "0.0%"
    assert mfu(1e12, 0.0) is None


def test_unknown_profile_error_lists_names():
    with pytest.raises(ValueError) as e:
        load_profile("B200")
    msg = str(e.value)
    assert "\n" not in msg and "'B200'" in msg
    for name in SHIPPED:
        assert name in msg
    with pytest.raises(ValueError, match="does not exist"):
        load_profile("/nonexistent/profile.yaml")


def test_profile_path_env_and_open_schema(tmp_path, monkeypatch):
    path = tmp_path / "mygpu.yaml"
    path.write_text(
        "name: mygpu\npeak_tflops: {bf16: 100, fp8: 200}\ndevice_memory_gib: 24\n"
        "all_to_all_gbps: {8: 120.5}\n"
    )
    prof = load_profile(str(path))
    assert prof.peak_tflops["bf16"] == 100.0 and prof.peak_tflops["fp8"] == 200.0
    assert prof.peak_tflops["fp32"] is None  # missing standard dtypes read as unknown
    assert prof.extra == {"all_to_all_gbps": {8: 120.5}}
    monkeypatch.setenv("SEQPAR_PROFILES", str(tmp_path))
    assert "mygpu" in available_profiles()
    assert load_profile("mygpu").device_memory_gib == 24.0


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"peak_tflops": {}}, "'name'"),
        ({"name": "x"}, "'peak_tflops'"),
        ({"name": "x", "peak_tflops": {"bf16": "fast"}}, "peak_tflops.bf16='fast'"),
        ({"name": "x", "peak_tflops": {"bf16": -1}}, "peak_tflops.bf16=-1"),
        ({"name": "x", "peak_tflops": {}, "device_memory_gib": True}, "device_memory_gib=True"),
    ],
)
def test_bad_profiles_are_one_line_errors(data, needle):
    with pytest.raises(ValueError) as e:
        profile_from_dict(data, "test.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_detect_cpu_and_resolve():
    assert detect_profile_name(torch.device("cpu")) == "cpu"
    assert resolve_profile("auto", torch.device("cpu")).name == "cpu"
    assert resolve_profile("H100-SXM", torch.device("cpu")).name == "H100-SXM"
    assert detect_profile_name(torch.device("meta")) is None
    assert resolve_profile("auto", torch.device("meta")) is None


@pytest.mark.parametrize(
    "device_name, mem_gib, expected",
    [
        ("NVIDIA A100-SXM4-40GB", 39.4, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", 79.2, "A100-80GB"),
        ("NVIDIA H100 80GB HBM3", 79.1, "H100-SXM"),
        ("NVIDIA H100 PCIe", 79.6, None),
        ("NVIDIA H100 NVL", 93.6, None),
        ("NVIDIA H200", 139.8, "H200"),
        ("NVIDIA H200 NVL", 139.8, None),
        ("NVIDIA GH200 480GB", 94.5, None),
        ("NVIDIA GeForce RTX 4090", 23.6, None),
    ],
)
def test_gpu_name_mapping(device_name, mem_gib, expected):
    assert profile_name_for_gpu(device_name, int(mem_gib * GIB)) == expected

"""Tests for autotune.hardware: the real NVML path on this GPU-less machine, plus a fake NVML."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import hardware

GIB = 1024**3


# --------------------------------------------------------------------------- the real path


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_real_probe_without_gpu_reports_error_instead_of_raising(tmp_path, no_cuda_env):
    doc = hardware.probe(tmp_path / "not" / "yet" / "created")

    assert doc["schema_version"] == hardware.SCHEMA_VERSION == 1
    assert doc["kind"] == "autotune.probe"
    assert doc["created_at"].endswith("+00:00")
    assert doc["gpus"] == []
    assert doc["nvml_error"] and "library" in doc["nvml_error"].lower()
    assert hardware.training_gpu(doc) is None

    host = doc["host"]
    assert host["ram_total_bytes"] > 0
    assert 0 < host["ram_available_bytes"] <= host["ram_total_bytes"]
    assert host["cpu_logical_cores"] >= 1
    assert host["disk_free_bytes"] > 0
    # The output dir does not exist yet: free space is measured at its nearest existing parent.
    assert host["disk_path"] == str(tmp_path)
    assert host["python"] == ".".join(map(str, sys.version_info[:3]))
    assert host["packages"]["torch"]  # installed in this venv
    assert host["packages"]["nvidia-ml-py"]
    json.dumps(doc)


def test_real_render_has_one_clear_no_gpu_line(no_cuda_env):
    text = hardware.render_table(hardware.probe())
    no_gpu = [line for line in text.splitlines() if line.startswith("No NVIDIA GPU")]
    assert no_gpu == ["No NVIDIA GPU available: NVML Shared Library Not Found (no driver, or no GPU on this machine)"]
    assert "Host" in text and "RAM" in text and "Disk" in text
    assert "\x1b" not in text  # plain text, no colour codes


def test_probe_does_not_import_torch():
    """What keeps `autotune probe` quick (bench/overhead_bench.py prints how quick)."""
    code = "import sys; import autotune.hardware as h; h.probe(); assert 'torch' not in sys.modules, 'probe imported torch'"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_torch_cuda_build_without_import_matches_torch():
    code = (
        "import autotune.hardware as h; before = h.torch_cuda_build();"
        "import torch; assert before == torch.version.cuda, (before, torch.version.cuda);"
        "assert h.torch_cuda_build() == torch.version.cuda"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the one fake
#
# This is the only fake in these tests, and it exists because this machine has no GPU:
# it mimics the slice of pynvml's API that autotune.hardware calls, with three GPUs.


class FakeNVML:
    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    class NVMLError_Unknown(NVMLError):
        pass

    GPUS: ClassVar[list] = [
        # name, uuid, bus id, total GiB, used GiB, (major, minor), processes
        ("NVIDIA A100-SXM4-80GB", "GPU-aaaa1111-0000", "00000000:07:00.0", 80, 2, (8, 0), [(101, 2 * GIB)]),
        ("Tesla V100-SXM2-16GB", "GPU-bbbb2222-0000", "00000000:0F:00.0", 16, 0, (7, 0), []),
        (
            "NVIDIA H100 80GB HBM3",
            "GPU-cccc3333-0000",
            "00000000:47:00.0",
            80,
            5,
            (9, 0),
            [(202, 3 * GIB), (203, None)],
        ),
    ]

    def __init__(self, bytes_strings=False):
        self.bytes_strings = bytes_strings
        self.init_calls = self.shutdown_calls = 0
        self.memory_fails: set[int] = set()
        self.processes_fail: set[int] = set()

    def _s(self, s):
        return s.encode() if self.bytes_strings else s

    def nvmlInit(self):
        self.init_calls += 1

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self):
        return self._s("550.54.15")

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.GPUS)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.GPUS):
            raise self.NVMLError("Invalid Argument")
        return i  # the handle is opaque to callers; the index is enough here

    def nvmlDeviceGetName(self, h):
        return self._s(self.GPUS[h][0])

    def nvmlDeviceGetUUID(self, h):
        return self._s(self.GPUS[h][1])

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.GPUS[h][2].encode())  # ctypes char arrays are bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        if h in self.memory_fails:
            raise self.NVMLError_Unknown("Unknown Error")
        total, used = self.GPUS[h][3] * GIB, self.GPUS[h][4] * GIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.GPUS[h][5]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if h in self.processes_fail:
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.GPUS[h][6]]

    # The interconnect, as NVML reports it: GPUs 0 and 2 share 12 NVLink links (NVML_FEATURE_ENABLED = 1);
    # GPU 1 has none (NotSupported on each link, as NVML says on a card without NVLink); 0-1 only meet at the
    # CPU's host bridge, with P2P reads not supported.
    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_P2P_CAPS_INDEX_READ, NVML_P2P_CAPS_INDEX_NVLINK, NVML_P2P_STATUS_OK = 0, 2, 0
    NVLINK_LINKS: ClassVar[dict] = {0: 12, 2: 12}
    TOPOLOGY: ClassVar[dict] = {(0, 1): 30, (0, 2): 10, (1, 2): 30}

    def nvmlDeviceGetNvLinkState(self, h, link):
        if h not in self.NVLINK_LINKS:
            raise self.NVMLError("Not Supported")
        return 1 if link < self.NVLINK_LINKS[h] else 0

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        nvlinked = a in self.NVLINK_LINKS and b in self.NVLINK_LINKS
        if index == self.NVML_P2P_CAPS_INDEX_NVLINK:
            return 0 if nvlinked else 4  # NVML_P2P_STATUS_NOT_SUPPORTED
        return 0 if nvlinked else 1  # NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.TOPOLOGY[(min(a, b), max(a, b))]


@pytest.fixture
def nvml():
    return FakeNVML()


def _uuids(doc):
    return [(g["index"], g["nvml_index"], g["uuid"]) for g in doc["gpus"]]


def test_all_gpus_reported(nvml, no_cuda_env):
    doc = hardware.probe(nvml=nvml)

    assert doc["nvml_error"] is None
    assert doc["driver"] == {"version": "550.54.15", "cuda": "12.4"}
    assert _uuids(doc) == [(0, 0, "GPU-aaaa1111-0000"), (1, 1, "GPU-bbbb2222-0000"), (2, 2, "GPU-cccc3333-0000")]
    a100, v100, h100 = doc["gpus"]
    assert a100 == {
        "index": 0,
        "nvml_index": 0,
        "name": "NVIDIA A100-SXM4-80GB",
        "uuid": "GPU-aaaa1111-0000",
        "pci_bus_id": "00000000:07:00.0",
        "memory_total_bytes": 80 * GIB,
        "memory_free_bytes": 78 * GIB,
        "memory_used_bytes": 2 * GIB,
        "memory_total_gb": 80.0,
        "memory_free_gb": 78.0,
        "compute_capability": "8.0",
        "bf16_supported": True,
        "other_processes": [{"pid": 101, "used_bytes": 2 * GIB}],
        "error": None,
    }
    assert v100["compute_capability"] == "7.0" and v100["bf16_supported"] is False
    assert v100["other_processes"] == []
    assert h100["other_processes"] == [{"pid": 202, "used_bytes": 3 * GIB}, {"pid": 203, "used_bytes": None}]
    assert hardware.training_gpu(doc)["uuid"] == "GPU-aaaa1111-0000"
    assert nvml.init_calls == nvml.shutdown_calls == 1
    json.dumps(doc)


def test_bytes_from_old_pynvml_are_decoded(no_cuda_env):
    doc = hardware.probe(nvml=FakeNVML(bytes_strings=True))
    assert doc["driver"]["version"] == "550.54.15"
    assert next(g["name"] for g in doc["gpus"]) == "NVIDIA A100-SXM4-80GB"
    assert all(isinstance(g["uuid"], str) for g in doc["gpus"])
    json.dumps(doc)


def test_cuda_visible_devices_integers_reorder(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    doc = hardware.probe(nvml=nvml)
    assert _uuids(doc) == [(0, 2, "GPU-cccc3333-0000"), (1, 0, "GPU-aaaa1111-0000")]
    assert hardware.training_gpu(doc)["nvml_index"] == 2
    assert doc["cuda_visible_devices"] == "2,0"


def test_cuda_visible_devices_uuids_and_prefixes(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb2222-0000, GPU-cccc")
    doc = hardware.probe(nvml=nvml)
    assert _uuids(doc) == [(0, 1, "GPU-bbbb2222-0000"), (1, 2, "GPU-cccc3333-0000")]


def test_cuda_visible_devices_empty_hides_everything(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    doc = hardware.probe(nvml=nvml)
    assert doc["gpus"] == [] and doc["nvml_error"] is None
    assert hardware.training_gpu(doc) is None
    assert "No NVIDIA GPU visible to CUDA: CUDA_VISIBLE_DEVICES=''" in hardware.render_table(doc)
    assert nvml.shutdown_calls == 1


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1,7,0", [1]),  # CUDA stops at the first invalid entry
        ("GPU-,0", []),  # "GPU-" is a prefix of every UUID: ambiguous, so invalid
        ("0,0,1", [0]),  # a repeated device is invalid too
        ("-1,0", []),
    ],
)
def test_cuda_visible_devices_invalid_entry_truncates(nvml, monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert [g["nvml_index"] for g in hardware.probe(nvml=nvml)["gpus"]] == expected


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(3)).flatmap(lambda p: st.integers(0, 3).map(lambda n: p[:n])))
def test_visible_gpus_cuda_index_is_position_in_list(order):
    physical = [{"nvml_index": i, "uuid": f"GPU-{i}{i}{i}", "index": None} for i in range(3)]
    for as_uuid in (False, True):
        env = ",".join(f"GPU-{i}{i}{i}" if as_uuid else str(i) for i in order)
        visible = hardware.visible_gpus(physical, env)
        assert [(g["index"], g["nvml_index"]) for g in visible] == list(enumerate(order))


def test_one_failing_gpu_does_not_hide_the_others(nvml, no_cuda_env):
    nvml.memory_fails.add(1)
    doc = hardware.probe(nvml=nvml)

    bad = doc["gpus"][1]
    assert bad["error"] and "Unknown Error" in bad["error"]
    assert bad["memory_total_bytes"] is None and bad["memory_free_gb"] is None
    # Everything that could still be read is there.
    assert bad["name"] == "Tesla V100-SXM2-16GB" and bad["compute_capability"] == "7.0"
    for good in (doc["gpus"][0], doc["gpus"][2]):
        assert good["error"] is None and good["memory_total_bytes"] == 80 * GIB
    text = hardware.render_table(doc)
    assert "GPU 1 error: memory: Unknown Error" in text
    assert nvml.shutdown_calls == 1


def test_unreadable_processes_are_none_not_an_error(nvml, no_cuda_env):
    nvml.processes_fail.add(0)
    gpu = hardware.probe(nvml=nvml)["gpus"][0]
    assert gpu["other_processes"] is None
    assert gpu["error"] is None


def test_zero_devices_is_not_an_error(nvml, no_cuda_env, monkeypatch):
    monkeypatch.setattr(nvml, "GPUS", [])
    doc = hardware.probe(nvml=nvml)
    assert doc["gpus"] == [] and doc["nvml_error"] is None
    assert "zero devices" in hardware.render_table(doc)
    assert nvml.shutdown_calls == 1


def test_init_failure_becomes_nvml_error_and_skips_shutdown(nvml, no_cuda_env, monkeypatch):
    def fail():
        raise nvml.NVMLError("Driver Not Loaded")

    monkeypatch.setattr(nvml, "nvmlInit", fail)
    doc = hardware.probe(nvml=nvml)
    assert doc["gpus"] == [] and doc["nvml_error"] == "Driver Not Loaded"
    assert nvml.shutdown_calls == 0


def test_render_table_aligns_gpu_columns(nvml, no_cuda_env):
    text = hardware.render_table(hardware.probe(nvml=nvml))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("CUDA"))
    rows = lines[header + 2 : header + 5]
    assert [r.split()[0] for r in rows] == ["0", "1", "2"]
    name_col = lines[header].index("Name")
    assert [r[name_col:].split("  ")[0] for r in rows] == [g[0] for g in FakeNVML.GPUS]
    assert "Driver: 550.54.15   CUDA (driver): 12.4" in text
    assert "1 (2.00 GiB)" in rows[0] and "none" in rows[1] and "2 (3.00 GiB)" in rows[2]


# --------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_leaves_no_temp_files(tmp_path, nvml, no_cuda_env):
    doc = hardware.probe(tmp_path, nvml=nvml)
    path = tmp_path / "sub" / "probe.json"
    hardware.save_probe(doc, path)
    assert json.loads(path.read_text(encoding="utf-8")) == doc
    assert [p.name for p in path.parent.iterdir()] == ["probe.json"]


def test_cuda_visible_devices_empty_hides_a_single_gpu_too():
    """ "" is a prefix of every UUID; with exactly one GPU a prefix match would wrongly keep it visible."""
    one = [{"nvml_index": 0, "uuid": "GPU-aaaa-1111", "name": "only"}]
    assert hardware.visible_gpus(one, "") == []
    assert hardware.visible_gpus(one, " ") == []
    assert [g["index"] for g in hardware.visible_gpus(one, "GPU-aaaa")] == [0]


# --------------------------------------------------------------------------- interconnect


def test_interconnect_names_nvlink_p2p_and_topology_per_pair(nvml, no_cuda_env):
    doc = hardware.probe(nvml=nvml)
    ic = doc["interconnect"]
    assert ic["nvlink_active_links"] == {"0": 12, "1": None, "2": 12}
    by_pair = {tuple(p["gpus"]): p for p in ic["pairs"]}
    assert by_pair[(0, 2)] == {"gpus": [0, 2], "p2p": True, "nvlink": True, "topology": "one PCIe switch"}
    assert by_pair[(0, 1)] == {"gpus": [0, 1], "p2p": False, "nvlink": False, "topology": "one PCIe host bridge"}
    text = hardware.render_table(doc)
    assert "GPU 0 <-> GPU 2: NVLink (12 / 12 active links), P2P ok, one PCIe switch" in text
    assert "GPU 0 <-> GPU 1: no NVLink, no P2P, one PCIe host bridge" in text
    json.dumps(doc)


def test_interconnect_follows_cuda_numbering(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    pairs = hardware.probe(nvml=nvml)["interconnect"]["pairs"]
    assert pairs == [{"gpus": [0, 1], "p2p": True, "nvlink": True, "topology": "one PCIe switch"}]


def test_interconnect_queries_a_driver_lacks_are_unknown_not_errors(nvml, no_cuda_env, monkeypatch):
    def not_supported(*args):
        raise nvml.NVMLError("Not Supported")

    monkeypatch.setattr(nvml, "nvmlDeviceGetP2PStatus", not_supported)
    monkeypatch.delattr(FakeNVML, "nvmlDeviceGetTopologyCommonAncestor")  # an older binding
    doc = hardware.probe(nvml=nvml)
    pair = doc["interconnect"]["pairs"][0]
    assert (pair["p2p"], pair["nvlink"], pair["topology"]) == (None, None, None)
    assert all(g["error"] is None for g in doc["gpus"])  # nothing of it is a GPU error
    assert "NVLink unknown, P2P unknown, topology unknown" in hardware.render_table(doc)


def test_one_gpu_has_no_interconnect(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    doc = hardware.probe(nvml=nvml)
    assert doc["interconnect"] is None and "Interconnect" not in hardware.render_table(doc)

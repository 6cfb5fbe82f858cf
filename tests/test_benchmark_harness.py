"""benchmarks/harness.py's results files say which CPU measured them: scores after the same steps can differ
between CPU generations that report the same model name, so a record names the family, the model number and
the instruction set torch's kernels use."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_script import load_benchmark

# two processors of one CPU, as Linux lists them (fields trimmed); the second block must not override the first
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: another name

"""


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("harness")


def test_cpu_identity_reads_the_first_processor_and_torchs_instruction_set(harness, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert harness.cpu_identity(cpuinfo) == {
        "model_name": "AMD EPYC",
        "family": "25",
        "model": "17",
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def test_cpu_identity_without_cpuinfo_leaves_the_fields_empty(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness.platform, "processor", lambda: "")
    identity = harness.cpu_identity(tmp_path / "missing")
    assert identity == {
        "model_name": "",
        "family": "",
        "model": "",
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def test_a_results_file_names_the_cpu(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    path = harness.report("probe", [{"setting": "a", "step_s": 1.5}], {"ratio": 0.5})
    written = json.loads(path.read_text())
    assert written["machine"]["cpu"] == harness.cpu_identity()
    assert written["rows"] == [{"setting": "a", "step_s": 1.5}]
    assert written["summary"] == {"ratio": 0.5}
    assert harness.report("probe2", [{"a": 1}], smoke=True) is None
    assert not (tmp_path / "probe2.json").exists()

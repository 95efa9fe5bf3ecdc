"""`spark-mcore doctor` on the CPU machine, and the NCCL comparison with a rollout interpreter."""

from __future__ import annotations

import json
import sys

from spark_mcore import doctor
from spark_mcore.cli import main


def test_doctor_exits_0_on_cpu_and_names_what_is_missing(capsys) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "CUDA", "NCCL", "megatron-core", "transformer-engine", "apex", "nvidia-dali", "sglang"):
        assert name in out


def test_doctor_reports_configured_features_and_strict(capsys) -> None:
    assert main(["doctor", "--set", "rollout.engine=sglang", "--strict"]) in (0, 1)
    out = capsys.readouterr().out
    if "no CUDA device" in out:
        assert "needed by rollout.engine=sglang" in out and "PROBLEM: CUDA is missing" in out
    assert main(["doctor", "--set", "trainer.fp8=hybrid"]) == 0  # the config error is reported, not raised
    assert "PROBLEM: config: trainer.fp8=hybrid" in capsys.readouterr().out or doctor.accel.te_available()


def test_nccl_mismatch_with_the_sglang_environment(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "sglang_python"
    reply = json.dumps({"sglang": "0.5.23", "error": None, "torch": "2.14.1", "nccl": "2.27.3"})
    fake.write_text(f"#!{sys.executable}\nprint({reply!r})\n")
    fake.chmod(0o755)
    monkeypatch.setattr(doctor, "nccl_version", lambda: "2.26.2")
    found = {f.name: f for f in doctor.machine_findings(str(fake))}
    f = found[f"sglang ({fake})"]
    assert not f.ok and "trainer NCCL 2.26.2 differs" in f.detail and "Mismatched NCCL version" in f.detail
    monkeypatch.setattr(doctor, "nccl_version", lambda: "2.27.3")
    assert {f.name: f for f in doctor.machine_findings(str(fake))}[f"sglang ({fake})"].ok
    missing = doctor.probe_sglang_env(str(tmp_path / "nope"))
    assert missing["sglang"] is None and "nope" in str(missing["error"])

"""`mauctl doctor`: the machine report, its JSON, the data checks, and the smoke test's own checks.

The whole `mauctl doctor --smoke` runs in .ci/run (about two minutes on the CPU); here its parts.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
from conftest import mauctl_env, run_mauctl, write_image_folder

from mauctl import doctor

REPORT = ["versions", "gpu", "cpu", "open files", "/dev/shm", "disk", "gloo", "nccl"]


def _lines(text: str) -> dict[str, str]:
    """{check name: status} from PASS/FAIL/SKIP lines."""
    found = {}
    for line in text.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            found[rest.partition(":")[0]] = status
    return found


def test_the_report_names_every_check_on_one_line_each_and_exits_0_on_a_healthy_machine(tmp_path):
    done = run_mauctl("doctor", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    found = _lines(done.stdout)
    assert list(found) == REPORT
    assert found["gloo"] == "PASS" and found["cpu"] == "PASS" and found["disk"] == "PASS"
    assert "Traceback" not in done.stderr


def test_json_parses_and_holds_the_same_checks_with_what_to_do(tmp_path):
    done = run_mauctl("doctor", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "mauctl.doctor/1" and report["ok"] is True
    assert [c["name"] for c in report["checks"]] == REPORT
    assert {"name", "status", "detail", "fix"} <= set(report["checks"][0])
    assert report["facts"]["cores"] >= 1 and report["facts"]["device"] == "cpu"


def test_with_data_it_counts_the_images_and_names_the_bad_files_it_sampled(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    write_image_folder(tmp_path / "data", classes=3, per_class=2, split="val")
    (data / "train" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    done = run_mauctl("doctor", str(data), "--json", cwd=tmp_path)
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["data"]["status"] == "PASS"
    assert "25 images in 3 classes" in checks["data"]["detail"] and "6 in val/" in checks["data"]["detail"]
    decode = checks["decode"]
    assert "1 of 25 sampled do not decode" in decode["detail"] and "broken.jpg" in decode["detail"]
    # 1/25 is above the default data.max_bad_fraction (0.1 %): a run would stop, so the doctor fails
    assert decode["status"] == "FAIL" and "repair or remove" in decode["fix"]
    assert done.returncode == 1
    assert "1 check failed: decode" in done.stderr


def test_an_open_file_limit_too_low_for_the_loader_fails_and_says_how_to_raise_it(tmp_path):
    def low_limit():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))

    done = subprocess.run([sys.executable, "-m", "mauctl", "doctor", "--set", "data.workers=8"],
                          cwd=tmp_path, env=mauctl_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=low_limit, check=False)
    line = next(x for x in done.stdout.splitlines() if x.startswith(("PASS open files", "FAIL open files")))
    assert line.startswith("FAIL open files: limit 300"), line
    assert "needs about 512 (8 loader workers" in line and "ulimit -n" in line
    assert done.returncode == 1


def test_a_work_folder_that_holds_files_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    done = run_mauctl("doctor", "--smoke", "--work", str(tmp_path / "mine"), cwd=tmp_path)
    assert done.returncode == 2
    assert "--work" in done.stderr and "not an empty folder" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_steps_checks_run_in_process_and_see_channels_last_kept(tmp_path):
    """The CUDA smoke's in-process checks, on the CPU with channels_last forced on (no CUDA here: the
    host-sync, recompile and nvJPEG checks are CUDA's and do not run)."""
    plan = doctor.Smoke("cpu", "resnet18", 32, 32, 64, classes=2, per_class=16, picture=(48, 40),
                        settings=(("run.channels_last", True), ("model.bn_splits", 2), ("data.workers", 0)))
    doctor.synthetic_jpegs(tmp_path / "data", plan)
    seen = []
    doc = doctor.Doctor(seen.append)
    doctor.in_process_step(doc, tmp_path / "data", plan)
    assert [c.name for c in doc.checks] == ["cpu warm-up", "cpu channels_last", "cpu steady step"]
    assert all(c.status == "PASS" for c in doc.checks), seen
    assert "all 40 convolution/BatchNorm inputs" in doc.checks[1].detail


def test_a_failing_check_is_a_fail_line_that_names_the_exception_and_the_doctor_goes_on():
    seen = []
    doc = doctor.Doctor(seen.append)
    doc.run("first", lambda: 1 / 0)
    doc.run("second", lambda: ("PASS", "fine"))
    assert seen == ["FAIL first: ZeroDivisionError: division by zero; rerun with --debug for the traceback",
                    "PASS second: fine"]
    assert doc.failed and json.loads(doc.json())["ok"] is False


@pytest.mark.parametrize("pipeline, expected", [("pil", 64 * 2 * 3 * 224 * 224 * 4), ("tensor", 64 * 2 * 3 * 224 * 224)])
def test_shared_memory_counts_what_the_workers_hand_over(pipeline, expected):
    from mauctl.config import load_config

    cfg = load_config("pretrain", environ={}).config
    assert doctor.batch_bytes(cfg, processes=4, pipeline=pipeline) == expected

"""Waiting for a POC job: progress while it runs, a clear error when it outlasts its timeout (no federation)."""

from contextlib import contextmanager

import pytest
from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

from split_unet.launch.poc import PocError, PocFederation


class _Session:
    """Stands in for NVFlare's Session: reports ``polls`` RUNNING statuses, then ``code``."""

    def __init__(self, polls: int, code: MonitorReturnCode, final: str):
        self.polls, self.code, self.final = polls, code, final

    def monitor_job_and_return_job_meta(self, job_id, timeout, poll_interval, cb):
        for _ in range(self.polls):
            assert cb(self, job_id, {"status": "RUNNING"}) is True
        return self.code, {"status": self.final}


def _federation(tmp_path, monkeypatch, session: _Session) -> PocFederation:
    federation = PocFederation(tmp_path / "federation", tmp_path / "sites")

    @contextmanager
    def fake_session():
        yield session
    monkeypatch.setattr(federation, "session", fake_session)
    return federation


def test_wait_reports_progress_and_returns_the_final_status(tmp_path, monkeypatch):
    federation = _federation(tmp_path, monkeypatch, _Session(3, MonitorReturnCode.JOB_FINISHED, "FINISHED:COMPLETED"))
    heard = []
    assert federation.wait("job-1", timeout=60, progress=heard.append, report_every=0) == "FINISHED:COMPLETED"
    assert len(heard) == 3 and all(line.startswith("job job-1: RUNNING after") for line in heard)


def test_wait_past_its_timeout_says_what_to_do(tmp_path, monkeypatch):
    federation = _federation(tmp_path, monkeypatch, _Session(1, MonitorReturnCode.TIMEOUT, "RUNNING"))
    with pytest.raises(PocError, match=r"job job-2 did not end within 5 s \(last status RUNNING\).*--job-timeout"):
        federation.wait("job-2", timeout=5)

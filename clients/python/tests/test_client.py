"""gpu_manager_client against the real daemon on a simulated GPU (see conftest.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from gpu_manager_client import (
    BadRequest,
    Busy,
    CannotFit,
    Claimed,
    GpuManager,
    GpuManagerError,
    InvalidConfig,
    LeaseHeld,
    NotFound,
    ProxyStatus,
    Unreachable,
    gpu_lock,
)


def ops(report):
    return [f"{a['op']} {a['service']}" for a in report["actions"]]


def test_status_is_the_ac2_shape(daemon):
    status = GpuManager(daemon.url).status()
    assert status["vram"]["total_mb"] == 24576
    assert set(status["services"]) == {"comfyui", "cosyvoice", "vidi", "ollama"}
    assert status["services"]["vidi"]["state"] == "stopped"
    assert "holder" in status["lock"]


def test_the_url_and_token_come_from_the_environment(daemon, monkeypatch):
    monkeypatch.setenv("GPU_MANAGER_URL", daemon.url)
    monkeypatch.setenv("GPU_MANAGER_TOKEN", "s3cret")
    gm = GpuManager()
    assert gm.url == daemon.url and gm.token == "s3cret"
    assert gm.services() == ["comfyui", "cosyvoice", "ollama", "vidi"]


def test_phases_converge_and_report_their_actions(daemon):
    gm = GpuManager(daemon.url)
    report = gm.prepare_for_phase(2)
    assert ops(report) == ["start vidi"]
    assert report["services"]["vidi"] == "ready"
    report = gm.prepare_for_phase(3)
    # The stop and the start fit side by side and run together: in the order they end.
    assert sorted(ops(report)) == ["start cosyvoice", "stop vidi"]
    assert list(daemon.allocations().values()) == [4096]
    assert daemon.oom_log() == ""


def test_can_fit_answers_by_the_budget(daemon):
    gm = GpuManager(daemon.url)
    gm.prepare_for_phase(3)  # CosyVoice holds 4096 of the 23040 MB budget
    assert gm.can_fit(18944) is True
    assert gm.can_fit(18945) is False
    detail = gm.can_fit_detail(20480, priority=100)
    assert detail["fits"] is False
    assert detail["budget_mb"] == 23040
    assert detail["would_preempt"] == ["cosyvoice"]
    with pytest.raises(BadRequest) as refused:
        gm.can_fit(0)
    assert refused.value.status == 400 and refused.value.kind == "bad_request"


def test_start_preempts_and_refusals_raise_by_meaning(daemon):
    gm = GpuManager(daemon.url)
    gm.prepare_for_phase(3)
    report = gm.start("comfyui")
    assert ops(report) == ["stop cosyvoice", "start comfyui"], json.dumps(report)
    assert report["services"]["cosyvoice"] == "preempted"

    with pytest.raises(CannotFit) as refused:
        gm.start("ollama")
    error = refused.value
    assert isinstance(error, GpuManagerError)
    assert error.status == 409 and error.kind == "cannot_fit"
    assert error.body["shortfall_mb"] > 0
    assert "comfyui" in str(error)

    with pytest.raises(NotFound) as unknown:
        gm.start("nope")
    assert "vidi" in unknown.value.body["known"]
    report = gm.stop("comfyui")
    assert ops(report)[0] == "stop comfyui"


def test_a_busy_stop_is_refused_untouched_then_forced(daemon):
    gm = GpuManager(daemon.url)
    gm.prepare_for_phase(3)
    job = requests.post(daemon.standin("cosyvoice") + "/job", params={"ms": 60000}, timeout=5)
    assert job.status_code == 202, job.text

    with pytest.raises(Busy) as refused:
        gm.stop("cosyvoice")
    error = refused.value
    assert isinstance(error, GpuManagerError)
    assert error.status == 409 and error.kind == "busy"
    assert error.body["service"] == "cosyvoice"
    assert error.body["answer"]["/queue_running"], error.body
    assert gm.status()["services"]["cosyvoice"]["state"] == "ready"
    assert daemon.lost_log() == ""

    # The job runs for a minute: only a stop that skips draining ends before it.
    report = gm.stop("cosyvoice", force=True)
    assert ops(report) == ["stop cosyvoice"], json.dumps(report)
    assert report["services"]["cosyvoice"] == "stopped"
    assert "cosyvoice" in daemon.lost_log()


def test_wait_false_answers_at_once(daemon):
    gm = GpuManager(daemon.url)
    accepted = gm.prepare_for_phase(2, wait=False)
    assert accepted["accepted_only"] is True
    deadline = time.monotonic() + 30
    while gm.status()["desired"]["converged_generation"] < accepted["generation"]:
        assert time.monotonic() < deadline, gm.status()
        time.sleep(0.05)
    assert gm.status()["services"]["vidi"]["state"] == "ready"


def test_events_stream_the_transition(daemon):
    gm = GpuManager(daemon.url)
    seen = []
    stream = gm.events()

    def follow():
        for event in stream:
            seen.append(event)
            if event["type"] == "action_finished":
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    gm.prepare_for_phase(2)
    thread.join(30)
    types = [event["type"] for event in seen]
    assert "desired_accepted" in types, seen
    finished = [e for e in seen if e["type"] == "action_finished"]
    assert finished and finished[0]["action"]["service"] == "vidi", seen


def test_while_gpu_lock_is_held_prepare_for_phase_raises_lease_held(daemon):
    gm = GpuManager(daemon.url)
    with gpu_lock(daemon.redis_url, key=daemon.lease_key, timeout=60) as lock:
        with pytest.raises(LeaseHeld) as refused:
            gm.prepare_for_phase(2)
        error = refused.value
        assert error.status == 423 and error.kind == "lease_held"
        assert error.body["holder"] == lock.local.token.decode()
        assert daemon.allocations() == {}, "nothing started while the lock was held"
    # Released: the daemon converges on the phase it was asked for.
    deadline = time.monotonic() + 30
    while gm.status()["services"]["vidi"]["state"] != "ready":
        assert time.monotonic() < deadline, gm.status()
        time.sleep(0.05)
    # And between transitions the lock is free for Python again, without waiting.
    with gpu_lock(daemon.redis_url, key=daemon.lease_key, timeout=10, blocking_timeout=5):
        pass


def test_an_unreachable_daemon_is_one_error_with_no_status():
    with pytest.raises(Unreachable) as refused:
        GpuManager("http://127.0.0.1:9", timeout=2).status()
    assert refused.value.status is None
    assert "gpu-manager serve" in str(refused.value)


def claim_holders(gm, name):
    return [c["holder"] for c in gm.status()["services"][name].get("claims", [])]


def test_a_claim_session_is_renewed_past_its_ttl_and_released_on_an_exception(daemon):
    gm = GpuManager(daemon.url)
    with pytest.raises(RuntimeError, match="render failed"):
        with gm.claim("cosyvoice", ttl=3, holder="tts-batch") as session:
            assert session.report["services"]["cosyvoice"] == "ready", session.report
            pid = gm.status()["services"]["cosyvoice"]["pids"]
            # Twice the ttl: only the renewals keep it.
            time.sleep(6.5)
            assert session.renewals >= 3, session.renewals
            assert session.renewal_error is None, session.renewal_error
            assert claim_holders(gm, "cosyvoice") == ["tts-batch"]
            with pytest.raises(Claimed) as refused:
                gm.stop("cosyvoice")
            assert refused.value.body["holders"] == ["tts-batch"]
            assert gm.status()["services"]["cosyvoice"]["pids"] == pid
            raise RuntimeError("render failed")
    assert claim_holders(gm, "cosyvoice") == []
    gm.stop("cosyvoice")


def test_a_claim_that_cannot_fit_raises_cannot_fit_with_the_blocking_claims(daemon):
    gm = GpuManager(daemon.url)
    with gm.claim("comfyui", ttl=600, holder="render-job-42"):
        with pytest.raises(CannotFit) as refused:
            with gm.claim("ollama", ttl=600, holder="chat"):
                pytest.fail("the block must not run")
        assert [c["holder"] for c in refused.value.claims] == ["render-job-42"]
        assert claim_holders(gm, "ollama") == []
    assert claim_holders(gm, "comfyui") == []


@pytest.mark.parametrize("daemon", [{"proxy": {"vidi": ", idle_ms: 60000"}}], indirect=True)
def test_a_proxied_service_status_carries_its_proxy_traffic_and_demand(daemon):
    gm = GpuManager(daemon.url)
    proxies = gm.proxies()
    assert sorted(proxies) == ["vidi"], proxies
    assert "proxy" not in gm.status()["services"]["cosyvoice"]
    listen = f"127.0.0.1:{daemon.proxy_ports['vidi']}"
    assert proxies["vidi"] == ProxyStatus(
        listen=listen,
        upstream=f"http://127.0.0.1:{daemon.service_ports['vidi']}",
        in_flight=0, waiting=0, upgraded=0, demanded=False,
        demanded_until_ms=None, last_request_ms=None,
    )

    # A request through the proxy starts the stopped vidi and leaves it demanded for
    # its idle_ms (60 s) after the request ended.
    asked_ms = time.time() * 1000
    http = requests.Session()
    http.trust_env = False
    answer = http.get(f"http://{listen}/state", timeout=30)
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 10
    while gm.proxies()["vidi"].demanded_until_ms is None and time.monotonic() < deadline:
        time.sleep(0.05)
    used = gm.proxies()["vidi"]
    assert used.demanded and (used.in_flight, used.waiting) == (0, 0), used
    assert asked_ms - 1000 <= used.last_request_ms <= time.time() * 1000, used
    assert used.demanded_until_ms is not None, used
    left_ms = used.demanded_until_ms - time.time() * 1000
    assert 45_000 < left_ms <= 61_000, used
    assert gm.status()["services"]["vidi"]["state"] == "ready"


def test_reload_reports_what_changed_and_a_broken_config_raises_invalid_config(daemon):
    gm = GpuManager(daemon.url)
    config = daemon.folder / "gpu-manager.yaml"
    good = config.read_text()
    config.write_text(good + "\n")
    report = gm.reload()
    assert report["generation"] == 1 and report["changed"] == [], report
    config.write_text(good + "  broken: [\n")
    with pytest.raises(InvalidConfig) as refused:
        gm.reload()
    assert refused.value.status == 422
    assert str(config) in str(refused.value)
    assert gm.status()["config"]["error"], gm.status()["config"]

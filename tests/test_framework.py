"""The command framework over real HTTP: envelopes, sync/async, callbacks, retries, restarts."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from pydantic import Field

from kvmagent.core.errors import AgentError
from kvmagent.core.logs import mask_text
from kvmagent.core.models import AgentRequest, AgentResponse, secret
from kvmagent.core.plugin import ASYNC, SYNC, Plugin

from .conftest import AgentClient


class EchoCmd(AgentRequest):
    vm_instance_uuid: str = Field(min_length=1)
    count: int = Field(1, ge=0, le=10)
    password: str | None = secret(default=None)
    fail: str | None = None


class EchoRsp(AgentResponse):
    vm_instance_uuid: str = ""
    count: int = 0


def make_test_plugin(runs: list[str], gate: asyncio.Event | None = None) -> Plugin:
    plugin = Plugin("test")

    @plugin.command("/test/sync", mode=SYNC)
    async def sync_cmd(ctx, req: EchoCmd) -> EchoRsp:
        runs.append(req.vm_instance_uuid)
        if req.fail == "agent":
            raise AgentError(f"cannot do it for {req.vm_instance_uuid}\nsecond line")
        if req.fail == "bug":
            raise KeyError("boom")
        return EchoRsp(vm_instance_uuid=req.vm_instance_uuid, count=req.count)

    @plugin.command("/test/async", mode=ASYNC)
    async def async_cmd(ctx, req: EchoCmd) -> EchoRsp:
        runs.append(req.vm_instance_uuid)
        if gate is not None:
            await gate.wait()
        if req.fail == "agent":
            raise AgentError("async failure")
        return EchoRsp(vm_instance_uuid=req.vm_instance_uuid, count=req.count)

    return plugin


@pytest.fixture
def runs() -> list[str]:
    return []


@pytest.fixture
async def tagent(make_agent, runs) -> AgentClient:
    return await make_agent(plugins=[make_test_plugin(runs)])


async def test_sync_reply_is_camel_case_and_ignores_unknown_fields(tagent, runs):
    status, body = await tagent.post("/test/sync", {"vmInstanceUuid": "vm1", "count": 3,
                                                    "fieldFromANewerMN": {"x": 1}})
    assert status == 200
    assert body == {"success": True, "error": None, "vmInstanceUuid": "vm1", "count": 3}
    assert runs == ["vm1"]


async def test_trailing_slash_matches(tagent):
    status, body = await tagent.post("/test/sync/", {"vmInstanceUuid": "vm1"})
    assert (status, body["success"]) == (200, True)


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "body is not valid JSON"),
    (b"[1, 2]", "body must be a JSON object, got list"),
    (b'{"count": 1}', "field 'vmInstanceUuid': Field required"),
    (b'{"vmInstanceUuid": "a", "count": 99}', "field 'count': Input should be less than or equal to 10"),
    (b'{"vmInstanceUuid": 7}', "field 'vmInstanceUuid': Input should be a valid string"),
])
async def test_invalid_body_is_400_naming_the_problem_and_runs_nothing(tagent, runs, raw, fragment):
    status, body = await tagent.post("/test/sync", raw=raw)
    assert status == 400
    assert body["success"] is False and fragment in body["error"]
    assert runs == []


async def test_unknown_path_is_404_with_envelope(tagent):
    status, body = await tagent.post("/no/such/thing", {})
    assert status == 404
    assert body == {"success": False, "error": "no such command: /no/such/thing"}


async def test_wrong_method_is_405_with_envelope(tagent):
    resp = await tagent.client.get("/test/sync")
    assert resp.status == 405
    assert (await resp.json())["success"] is False


async def test_handler_error_is_200_with_one_line_error(tagent):
    status, body = await tagent.post("/test/sync", {"vmInstanceUuid": "vm9", "fail": "agent"})
    assert status == 200
    assert body == {"success": False, "error": "cannot do it for vm9 second line"}


async def test_unexpected_exception_gives_no_traceback(tagent):
    status, body = await tagent.post("/test/sync", {"vmInstanceUuid": "vm9", "fail": "bug"})
    assert status == 200 and body["success"] is False
    assert body["error"] == "internal error: KeyError: 'boom'"
    assert "Traceback" not in json.dumps(body)


async def test_async_acknowledges_then_calls_back_exactly_once(tagent, mn, runs):
    taskuuid = uuid.uuid4().hex
    status, ack = await tagent.post("/test/async", {"vmInstanceUuid": "vm1", "count": 2},
                                    headers={"taskuuid": taskuuid, "callbackurl": mn.callback_url})
    assert (status, ack) == (200, {"success": True, "error": None})
    body = await mn.wait_callback(taskuuid)
    assert body == {"success": True, "error": None, "vmInstanceUuid": "vm1", "count": 2}
    await tagent.ctx.outbox.drain(5)
    assert mn.callbacks_for(taskuuid) == [body]


async def test_the_mn_decides_a_sync_command_called_with_a_callback_answers_by_callback(
        tagent, mn, runs, caplog):
    """ZStack calls /host/fact, /host/capacity, /vm/vmsync async although they read fine sync:
    whatever mode a command is declared with, taskuuid + callbackurl means a callback (the
    MN ignores the HTTP body). kvmHostAddons, which the MN appends, is ignored; the
    X-Resource-UUID header is logged with the task."""
    taskuuid = uuid.uuid4().hex
    caplog.set_level(logging.INFO, logger="kvmagent.command")
    status, ack = await tagent.post(
        "/test/sync", {"vmInstanceUuid": "vm2", "kvmHostAddons": {}},
        headers={"taskuuid": taskuuid, "callbackurl": mn.callback_url,
                 "X-Resource-UUID": "4f0c1b6e2a9d4c3f8e7b6a5d4c3b2a19"})
    assert (status, ack) == (200, {"success": True, "error": None})
    body = await mn.wait_callback(taskuuid)
    assert body == {"success": True, "error": None, "vmInstanceUuid": "vm2", "count": 1}
    assert runs == ["vm2"]
    line = next(r.getMessage() for r in caplog.records if taskuuid in r.getMessage())
    assert line.startswith("async /test/sync ")
    assert "resource=4f0c1b6e2a9d4c3f8e7b6a5d4c3b2a19" in line


async def test_async_invalid_body_still_gets_one_failure_callback(tagent, mn, runs):
    body = await tagent.call_async(mn, "/test/async", {"count": "many"})
    assert body["success"] is False
    assert "field 'vmInstanceUuid': Field required" in body["error"]
    assert "field 'count'" in body["error"]
    assert runs == []


async def test_async_handler_failure_callback(tagent, mn):
    body = await tagent.call_async(mn, "/test/async", {"vmInstanceUuid": "v", "fail": "agent"})
    assert body == {"success": False, "error": "async failure"}


async def test_async_without_callbackurl_runs_inline(tagent, runs):
    status, body = await tagent.post("/test/async", {"vmInstanceUuid": "inline"})
    assert status == 200
    assert body == {"success": True, "error": None, "vmInstanceUuid": "inline", "count": 1}


async def test_callbackurl_without_taskuuid_is_refused(tagent, mn, runs):
    status, body = await tagent.post("/test/async", {"vmInstanceUuid": "x"},
                                     headers={"callbackurl": mn.callback_url})
    assert status == 400 and "taskuuid" in body["error"]
    assert runs == []


async def test_duplicate_taskuuid_in_flight_is_not_run_twice(make_agent, mn, runs):
    gate = asyncio.Event()
    agent = await make_agent(plugins=[make_test_plugin(runs, gate)])
    headers = {"taskuuid": "t-dup", "callbackurl": mn.callback_url}
    for _ in range(3):
        status, ack = await agent.post("/test/async", {"vmInstanceUuid": "once"}, headers=headers)
        assert (status, ack["success"]) == (200, True)
    gate.set()
    await mn.wait_callback("t-dup")
    await agent.ctx.outbox.drain(5)
    assert runs == ["once"]
    assert len(mn.callbacks_for("t-dup")) == 1


async def test_dotted_taskuuids_are_journaled_apart(make_agent, mn, runs):
    gate = asyncio.Event()
    agent = await make_agent(plugins=[make_test_plugin(runs, gate)])
    for taskuuid in ("job.1", "job.2"):
        status, _ = await agent.post("/test/async", {"vmInstanceUuid": taskuuid},
                                     headers={"taskuuid": taskuuid, "callbackurl": mn.callback_url})
        assert status == 200
    assert agent.ctx.state.names("tasks") == ["tasks/job.1", "tasks/job.2"]
    gate.set()
    assert (await mn.wait_callback("job.1"))["vmInstanceUuid"] == "job.1"
    assert (await mn.wait_callback("job.2"))["vmInstanceUuid"] == "job.2"


async def test_a_refused_report_holds_up_only_its_own_stream(make_agent, mn):
    agent = await make_agent(delivery_retry_window=60)
    await agent.call("/host/connect", {"hostUuid": "h1", "sendCommandUrl": mn.send_command_url})
    mn.refuse_commandpath = "/kvm/reportvmstate"
    agent.ctx.reporter.report("/kvm/reportvmstate", {"vmUuid": "v1", "vmState": "Running"})
    agent.ctx.reporter.report("/kvm/reportvmstate", {"vmUuid": "v1", "vmState": "Shutdown"})
    agent.ctx.reporter.report("/kvm/reportselffencer", {"psUuids": ["ps1"], "vmUuidsString": "v2"})
    await mn.wait_report("/kvm/reportselffencer")
    assert mn.reports_for("/kvm/reportvmstate") == []
    mn.refuse_commandpath = None
    await mn.wait_report("/kvm/reportvmstate", lambda b: b["vmState"] == "Shutdown")
    assert [b["vmState"] for b in mn.reports_for("/kvm/reportvmstate")] == ["Running", "Shutdown"]


async def test_callback_retried_until_the_mn_accepts(tagent, mn):
    mn.fail_next = 3
    body = await tagent.call_async(mn, "/test/async", {"vmInstanceUuid": "r"}, taskuuid="t-retry")
    assert body["success"] is True
    assert mn.attempts == 4
    metrics = tagent.ctx.metrics.render().decode()
    assert 'kvmagent_delivery_retries_total{kind="callback"} 3.0' in metrics
    await tagent.ctx.outbox.drain(5)
    assert len(mn.callbacks_for("t-retry")) == 1


async def test_callback_given_up_after_window_is_logged_counted_and_kept(make_agent, mn, runs, caplog):
    agent = await make_agent(plugins=[make_test_plugin(runs)], delivery_retry_window=0.5)
    mn.fail_next = 10_000
    status, _ = await agent.post("/test/async", {"vmInstanceUuid": "lost"},
                                 headers={"taskuuid": "t-lost", "callbackurl": mn.callback_url})
    assert status == 200
    assert await agent.ctx.outbox.drain(10)
    assert mn.callbacks_for("t-lost") == []
    assert 'kvmagent_delivery_failures_total{kind="callback"} 1.0' in agent.ctx.metrics.render().decode()
    kept = [agent.ctx.state.load(n) for n in agent.ctx.state.names("undelivered")]
    assert [k["headers"]["taskuuid"] for k in kept] == ["t-lost"]
    assert any("given up" in r.getMessage() for r in caplog.records)


async def test_4xx_from_callback_is_final(tagent, mn):
    mn.fail_next, mn.fail_status = 1, 404
    status, _ = await tagent.post("/test/async", {"vmInstanceUuid": "x"},
                                  headers={"taskuuid": "t-404", "callbackurl": mn.callback_url})
    assert await tagent.ctx.outbox.drain(5)
    assert mn.attempts == 1 and mn.callbacks_for("t-404") == []


async def test_restart_sends_failure_for_interrupted_task_and_pending_callbacks(make_agent, mn, runs):
    gate = asyncio.Event()  # never set: the task is still running when the agent stops
    first = await make_agent(plugins=[make_test_plugin(runs, gate)])
    await first.post("/test/async", {"vmInstanceUuid": "cut"},
                     headers={"taskuuid": "t-cut", "callbackurl": mn.callback_url})
    # And a finished task whose callback could not be delivered before the stop.
    mn.fail_next = 10_000
    await first.post("/test/sync", {"vmInstanceUuid": "noop"})
    first.ctx.outbox.submit("callback", mn.callback_url, {"success": True, "error": None},
                            {"taskuuid": "t-pending"})
    await asyncio.sleep(0.1)
    await first.client.close()  # agent shutdown: running task cancelled
    mn.fail_next = 0

    await make_agent(plugins=[make_test_plugin(runs)])
    cut = await mn.wait_callback("t-cut")
    assert cut["success"] is False and "agent restarted while running /test/async" in cut["error"]
    assert (await mn.wait_callback("t-pending"))["success"] is True
    assert len(mn.callbacks_for("t-cut")) == 1


async def test_secrets_never_reach_the_log(tagent, caplog):
    caplog.set_level(logging.DEBUG)
    from kvmagent.core.logs import MaskingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(MaskingFilter())
    await tagent.post("/test/sync", {"vmInstanceUuid": "v", "password": "hunter2",
                                     "fail": "agent"})
    await tagent.post("/test/sync", {"vmInstanceUuid": "redis://:s3cr3t@10.0.0.1:6379/1",
                                     "fail": "agent"})
    text = caplog.text
    assert "/test/sync request body" in text
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "redis://:***@10.0.0.1" in text


@pytest.mark.parametrize("raw, masked", [
    ("juicefs://redis://user:pw@host:6379/1", "juicefs://redis://user:***@host:6379/1"),
    ("mysql://root:p%40ss@(127.0.0.1:3306)/db", "mysql://root:***@(127.0.0.1:3306)/db"),
    ("nfs://host/export", "nfs://host/export"),
    ("redis://:ab/cd@host:6379/1", "redis://:***@host:6379/1"),  # '/' in the password
    ("juicefs://mysql://u:p@ss@(h)/db", "juicefs://mysql://u:***@(h)/db"),  # '@' in it
    ("two urls http://a:b@c/d and redis://:e@f", "two urls http://a:***@c/d and redis://:***@f"),
    ("--secret-key=abc123 --access-key=AK", "--secret-key=*** --access-key=***"),
    ("Authorization: Bearer tok", "Authorization: ***"),
])
def test_mask_text(raw, masked):
    assert mask_text(raw) == masked


async def test_openapi_is_generated_from_models(tagent):
    resp = await tagent.client.get("/openapi.json")
    doc = await resp.json()
    op = doc["paths"]["/test/async"]["post"]
    assert op["x-kvmagent-mode"] == "async"
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    schema = doc["components"]["schemas"][ref]
    assert set(schema["properties"]) == {"vmInstanceUuid", "count", "password", "fail"}
    assert schema["required"] == ["vmInstanceUuid"]
    assert schema["properties"]["password"]["x-secret"] is True


async def test_metrics_count_requests_by_path_and_outcome(tagent):
    await tagent.post("/test/sync", {"vmInstanceUuid": "a"})
    await tagent.post("/test/sync", {})
    resp = await tagent.client.get("/metrics")
    text = await resp.text()
    assert 'kvmagent_requests_total{outcome="ok",path="/test/sync"} 1.0' in text
    assert 'kvmagent_requests_total{outcome="invalid",path="/test/sync"} 1.0' in text
    assert "kvmagent_request_duration_seconds_bucket" in text
    assert "kvmagent_async_tasks_in_flight" in text
    assert "kvmagent_libvirt_connected" in text


async def test_bearer_token(make_agent, runs):
    agent = await make_agent(plugins=[make_test_plugin(runs)], auth_token="t0ken")
    status, body = await agent.post("/test/sync", {"vmInstanceUuid": "a"})
    assert status == 401 and "bearer token" in body["error"] and runs == []
    status, body = await agent.post("/test/sync", {"vmInstanceUuid": "a"},
                                    headers={"Authorization": "Bearer t0ken"})
    assert (status, body["success"]) == (200, True)
    assert (await agent.client.get("/openapi.json")).status == 200


async def test_reporter_posts_to_the_connected_mn(make_agent, mn):
    agent = await make_agent()
    await agent.call("/host/connect", {"hostUuid": "h1", "sendCommandUrl": mn.send_command_url})
    agent.ctx.reporter.report("/kvm/reportvmstate", {"vmUuid": "v1", "vmState": "Running"})
    body = await mn.wait_report("/kvm/reportvmstate")
    assert body == {"hostUuid": "h1", "vmUuid": "v1", "vmState": "Running"}


async def test_reports_to_one_mn_keep_their_order_through_an_outage(make_agent, mn):
    agent = await make_agent()
    await agent.call("/host/connect", {"hostUuid": "h1", "sendCommandUrl": mn.send_command_url})
    mn.fail_next = 4
    for state in ["Running", "Paused", "Running", "Shutdown"]:
        agent.ctx.reporter.report("/kvm/reportvmstate", {"vmUuid": "v1", "vmState": state})
    assert await agent.ctx.outbox.drain(10)
    assert [b["vmState"] for b in mn.reports_for("/kvm/reportvmstate")] == \
        ["Running", "Paused", "Running", "Shutdown"]

"""Bytes that are not a valid request message: INVALID_ARGUMENT, one line, no traceback.

A real server on a free localhost port gets raw bytes through a channel whose
calls have no serializer: a string field that is not UTF-8, and a corrupt
encoding, on every unary method and on the stream (as its first message, and
later, while a helper call is pending). The answer is INVALID_ARGUMENT with
reason MALFORMED_MESSAGE and a one-line message; the server logs no error and
no traceback, and still serves.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_status import rpc_status
from support import wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec.client.client import Client
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings

TIMEOUT = 10.0
SERVICE = "/bpfexec.v1.Executor/"
NOT_UTF8 = b"\xff\xfe\xfd"
# Field 1 (`id`, `module_id`, `code`...) as a string or bytes of invalid UTF-8; field 2 too.
BAD_FIELD_1 = b"\x0a\x03" + NOT_UTF8
BAD_FIELD_2 = b"\x12\x03" + NOT_UTF8
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"  # a length far beyond the message's end
UNARY = {
    "LoadModule": BAD_FIELD_2,  # name
    "GetModule": BAD_FIELD_1,  # id
    "DeleteModule": BAD_FIELD_1,  # id
    "Execute": BAD_FIELD_2,  # function
}


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    base = Settings(port=0, metrics_port=0, entry_point_helpers=False, engine="interpreter")
    with serve_in_thread(dataclasses.replace(base)) as running:
        yield running


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def assert_refused(error: grpc.RpcError, message_type: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    message = error.details()
    assert "\n" not in message
    assert f"not a valid bpfexec.v1.{message_type} message" in message
    status = rpc_status.from_call(error)
    assert status is not None and "MALFORMED_MESSAGE" in str(status.details[0].value)


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("raw", [pytest.param("utf8", id="invalid-utf8"), "corrupt"])
@pytest.mark.parametrize("method", sorted(UNARY))
def test_unary_methods_refuse_bytes_that_do_not_parse(
    server: RunningServer,
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    method: str,
    raw: str,
) -> None:
    call = channel.unary_unary(SERVICE + method, request_serializer=None)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as caught:
        call(UNARY[method] if raw == "utf8" else CORRUPT, timeout=TIMEOUT)
    request_type = pb.DESCRIPTOR.services_by_name["Executor"].methods_by_name[method].input_type
    assert_refused(caught.value, request_type.name)
    assert_no_traceback(caplog)


@pytest.mark.parametrize("raw", [BAD_FIELD_1, CORRUPT], ids=["invalid-utf8", "corrupt"])
def test_a_stream_whose_first_message_does_not_parse_is_refused(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    # Field 1 of ExecuteStreamRequest is `start`; inside, field 1 is the ExecuteRequest
    # and its field 1 the module id: a string that is not UTF-8, one level down.
    nested = b"\x0a\x07\x0a\x05" + BAD_FIELD_1 if raw is BAD_FIELD_1 else raw
    call = channel.stream_stream(SERVICE + "ExecuteStream", request_serializer=None)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as caught:
        list(call(iter([nested]), timeout=TIMEOUT))
    assert_refused(caught.value, "ExecuteStreamRequest")
    assert_no_traceback(caplog)


def test_a_message_that_does_not_parse_later_in_the_stream_ends_it(
    server: RunningServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(server.address, timeout=TIMEOUT) as client:
        module = client.load(b"call 100\nexit\n")
    start = pb.ExecuteStreamRequest(
        start=pb.ExecuteStart(request=pb.ExecuteRequest(module_id=module.id), helper_numbers=[100])
    )
    helper_called = threading.Event()

    def requests() -> Iterator[bytes]:
        yield start.SerializeToString()
        helper_called.wait(TIMEOUT)
        yield CORRUPT

    call = channel.stream_stream(SERVICE + "ExecuteStream", request_serializer=None)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as caught:
        for reply in call(requests(), timeout=TIMEOUT):
            assert pb.ExecuteStreamResponse.FromString(reply).HasField("helper_call")
            helper_called.set()
    assert helper_called.is_set()
    assert_refused(caught.value, "ExecuteStreamRequest")
    assert_no_traceback(caplog)
    # The run was stopped, and the server still serves.
    wait_until(lambda: server.metrics.in_flight._value.get() == 0)
    with Client(server.address, timeout=TIMEOUT) as client:
        assert client.execute(client.load(b"r0 = 5\nexit\n")).return_value == 5


def test_malformed_calls_are_logged_and_counted_as_invalid_argument(
    server: RunningServer, channel: grpc.Channel
) -> None:
    handled = server.metrics.grpc_handled.labels(
        "unary", "bpfexec.v1.Executor", "GetModule", "INVALID_ARGUMENT"
    )
    before = handled._value.get()
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    requests_log = logging.getLogger("bpfexec.requests")
    level = requests_log.level
    requests_log.addHandler(handler)
    requests_log.setLevel(logging.INFO)
    try:
        call = channel.unary_unary(SERVICE + "GetModule", request_serializer=None)
        with pytest.raises(grpc.RpcError):
            call(CORRUPT, timeout=TIMEOUT)
        wait_until(lambda: handled._value.get() == before + 1)
        wait_until(lambda: "GetModule outcome=INVALID_ARGUMENT" in "\n".join(lines))
    finally:
        requests_log.removeHandler(handler)
        requests_log.setLevel(level)

"""The integration tier's fault proxy (devenv/faultproxy.py): which rule takes which request,
and what an injected answer looks like on the wire (through a real loopback upstream)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator

import pytest
import requests
from pytest_httpserver import HTTPServer

from devenv.faultproxy import Delay, DropWatch, Fail, FaultProxy, Gone, Rule, RuleBook, is_watch

SECRET = "/api/v1/namespaces/shop/secrets/orders-api"
TOKEN_REQUESTS = "/apis/m2m.dev/v1alpha1/tokenrequests"


def test_method_and_path_regex_select_the_rule() -> None:
    book = RuleBook()
    book.add(Rule(Fail(409), method="put", path=r"/secrets/orders-api$", times=None))
    assert book.select("PUT", SECRET) == Fail(409)
    assert book.select("GET", SECRET) is None
    assert book.select("PUT", SECRET + "-other") is None
    assert book.select("PUT", "/api/v1/namespaces/shop/secrets/orders-api") == Fail(409)


def test_skip_and_times_pick_the_nth_matching_request() -> None:
    book = RuleBook()
    rule = book.add(Rule(Fail(503), method="POST", path="/secrets", skip=1, times=2))
    answers = [book.select("POST", "/api/v1/namespaces/a/secrets") for _ in range(5)]
    assert answers == [None, Fail(503), Fail(503), None, None]
    assert (rule.seen, rule.applied, rule.exhausted) == (3, 2, True)


def test_first_applicable_rule_wins_and_a_skipping_rule_hides_nothing() -> None:
    book = RuleBook()
    first = book.add(Rule(Fail(500), path="/secrets", skip=1))
    book.add(Rule(Delay(0.5), path="/secrets", times=None))
    assert book.select("GET", SECRET) == Delay(0.5)  # the first rule only counts it
    assert book.select("GET", SECRET) == Fail(500)
    assert book.select("GET", SECRET) == Delay(0.5)  # the first rule is used up
    book.remove(first)
    assert [r.action for r in book.rules] == [Delay(0.5)]
    book.clear()
    assert book.select("GET", SECRET) is None


def test_query_regex_tells_two_watches_of_one_path_apart() -> None:
    """Kopf's TokenRequest watch sends no labelSelector; the operator's own one does."""
    book = RuleBook()
    book.add(Rule(Gone(), path="tokenrequests", query=r"^(?!.*labelSelector=)", times=None))
    assert book.select("GET", TOKEN_REQUESTS, "watch=true&resourceVersion=7") == Gone()
    assert book.select("GET", TOKEN_REQUESTS, "labelSelector=&watch=true") is None


def test_watch_flag_tells_watches_from_lists() -> None:
    assert is_watch(TOKEN_REQUESTS, "watch=true&resourceVersion=12")
    assert is_watch(TOKEN_REQUESTS, "watch=1")
    assert is_watch("/api/v1/watch/secrets", "")
    assert not is_watch(TOKEN_REQUESTS, "limit=500")
    assert not is_watch(TOKEN_REQUESTS, "watch=false")
    book = RuleBook()
    book.add(Rule(Gone(), path="tokenrequests", watch=True, times=None))
    assert book.select("GET", TOKEN_REQUESTS, "") is None
    assert book.select("GET", TOKEN_REQUESTS, "watch=true") == Gone()


@pytest.fixture
def proxy(httpserver: HTTPServer) -> Iterator[FaultProxy]:
    with FaultProxy(httpserver.url_for("/").rstrip("/")) as running:
        yield running


def test_forwards_and_records_what_it_answered(httpserver: HTTPServer, proxy: FaultProxy) -> None:
    httpserver.expect_request(SECRET, method="GET").respond_with_json({"kind": "Secret"})
    response = requests.get(f"{proxy.url}{SECRET}?a=1", timeout=5)
    assert response.json() == {"kind": "Secret"}
    [exchange] = proxy.requests("GET", "/secrets/")
    assert (exchange.status, exchange.query, exchange.injected) == (200, "a=1", False)


def test_fail_answers_a_kubernetes_status_and_never_reaches_upstream(
    httpserver: HTTPServer, proxy: FaultProxy
) -> None:
    proxy.add(Rule(Fail(409, "the object has been modified"), method="PUT", path="/secrets/"))
    response = requests.put(f"{proxy.url}{SECRET}", json={}, timeout=5)
    assert response.status_code == 409
    assert response.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "the object has been modified",
        "reason": "Conflict",
        "code": 409,
    }
    assert httpserver.log == []
    assert [str(e) for e in proxy.exchanges] == [f"PUT {SECRET} -> 409"]


def test_gone_is_one_error_event_of_code_410(proxy: FaultProxy) -> None:
    proxy.add(Rule(Gone(), path="tokenrequests", watch=True))
    response = requests.get(f"{proxy.url}{TOKEN_REQUESTS}?watch=true", timeout=5)
    assert response.status_code == 200
    [line] = response.text.splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


def test_drop_watch_cuts_the_stream_after_n_events(
    httpserver: HTTPServer, proxy: FaultProxy
) -> None:
    lines = [json.dumps({"type": "ADDED", "object": {"n": n}}) for n in range(3)]
    httpserver.expect_request(TOKEN_REQUESTS).respond_with_data(
        "\n".join(lines) + "\n", content_type="application/json"
    )
    proxy.add(Rule(DropWatch(after_events=1), path="tokenrequests", watch=True))
    received: list[bytes] = []
    url = f"{proxy.url}{TOKEN_REQUESTS}?watch=1"
    with (
        pytest.raises(requests.exceptions.ChunkedEncodingError),
        requests.get(url, stream=True, timeout=5) as response,
    ):
        received.extend(response.iter_lines())
    assert [json.loads(line)["object"]["n"] for line in received] == [0]


def test_clear_lets_delayed_requests_go_on_at_once(
    httpserver: HTTPServer, proxy: FaultProxy
) -> None:
    httpserver.expect_request(SECRET).respond_with_json({"kind": "Secret"})
    held = proxy.add(Rule(Delay(60), times=None))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(requests.get, f"{proxy.url}{SECRET}", timeout=30)
    deadline = time.monotonic() + 5
    while held.applied < 1 and time.monotonic() < deadline:
        time.sleep(0.005)  # polling for the positive signal: the request is held
    assert held.applied == 1
    assert not pending.done()
    proxy.clear()
    assert pending.result(timeout=5).json() == {"kind": "Secret"}
    pool.shutdown()


def test_an_exchange_knows_when_its_request_arrived_not_only_when_it_was_answered(
    httpserver: HTTPServer, proxy: FaultProxy
) -> None:
    """A request sent before a moment and answered after it is told apart by `received_at`."""
    httpserver.expect_request(SECRET).respond_with_json({"kind": "Secret"})
    proxy.add(Rule(Delay(0.3)))
    before = time.monotonic()
    assert requests.get(f"{proxy.url}{SECRET}", timeout=5).ok
    [exchange] = proxy.requests("GET", "/secrets/")
    assert before <= exchange.received_at
    assert exchange.at - exchange.received_at >= 0.3  # held by the rule in between

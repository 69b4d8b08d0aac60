"""GET /metrics on the shim: Prometheus' format, parsed by prometheus_client's own
parser, and its counters moving by what a chat through the network did."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pnode.inference import openai_api
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow


async def scrape(url: str, key: str) -> dict[str, float]:
    """Every sample of a /metrics page, by name and labels."""
    async with httpx.AsyncClient() as http:
        page = await http.get(
            url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"}
        )
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(page.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def test_counters_move_by_what_a_chat_did(network: Network) -> None:
    provider = await network.add_provider()
    provider_url = await network.nursery.start(
        openai_api.serve, provider, network.api_key, "127.0.0.1:0"
    )
    api = openai.AsyncOpenAI(base_url=network.shim_url, api_key=network.api_key, max_retries=0)
    with trio.fail_after(BOUND_S):
        consumer_before = await scrape(network.shim_url, network.api_key)
        provider_before = await scrape(provider_url, network.api_key)
        answer = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi!"}], temperature=0, max_tokens=12
        )
        consumer_after = await scrape(network.shim_url, network.api_key)
        provider_after = await scrape(provider_url, network.api_key)
    assert answer.usage is not None
    tokens, prompt = answer.usage.completion_tokens, answer.usage.prompt_tokens

    def moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
        return after[name] - before.get(name, 0.0)

    c = lambda name: moved(consumer_before, consumer_after, name)  # noqa: E731
    p = lambda name: moved(provider_before, provider_after, name)  # noqa: E731
    assert c("p2pnode_consumer_requests_total") == 1
    assert c("p2pnode_consumer_sessions_opened_total") == 1
    assert c("p2pnode_consumer_completion_tokens_total") == tokens
    assert c("p2pnode_consumer_prompt_tokens_total") == prompt
    assert p("p2pnode_provider_requests_total") == 1
    assert p("p2pnode_provider_sessions_total") == 1
    assert p("p2pnode_provider_completion_tokens_total") == tokens
    assert p("p2pnode_provider_prompt_tokens_total") == prompt
    assert "p2pnode_provider_requests_total" not in consumer_after  # it serves no model
    # One time to first token observed, somewhere in the buckets, which count up.
    ttft = "p2pnode_consumer_time_to_first_token_seconds"
    assert c(f"{ttft}_count") == 1
    assert 0 < c(f"{ttft}_sum") < BOUND_S
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v)
        for k, v in consumer_after.items()
        if k.startswith(f"{ttft}_bucket")
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert buckets[-1] == (float("inf"), consumer_after[f"{ttft}_count"])
    assert c("p2pnode_consumer_providers_tried_total") == 1
    # The provider's side of the same answer: one first token, one speed, in its buckets.
    assert p("p2pnode_provider_time_to_first_token_seconds_count") == 1
    assert 0 < p("p2pnode_provider_time_to_first_token_seconds_sum") < c(f"{ttft}_sum")
    assert p("p2pnode_provider_tokens_per_second_count") == (1 if tokens >= 2 else 0)
    assert provider_after["p2pnode_provider_slots{state=free}"] >= 1
    assert provider_after["p2pnode_provider_queue_length"] == 0
    assert "p2pnode_provider_slots{state=free}" not in consumer_after
    # One-hot reachability; nobody misbehaved.
    states = [v for k, v in consumer_after.items() if k.startswith("p2pnode_reachability{")]
    assert sorted(states) == [0, 0, 1]
    assert consumer_after["p2pnode_misbehaving_peers{state=banned}"] == 0
    assert consumer_after["p2pnode_connections{kind=direct}"] >= 1
    assert consumer_after["p2pnode_offers_known"] >= 1
    assert consumer_after["p2pnode_uptime_seconds"] > 0


async def test_metrics_need_the_key_and_a_loopback_host(network: Network) -> None:
    url = network.shim_url.removesuffix("/v1") + "/metrics"
    async with httpx.AsyncClient() as http:
        bare = await http.get(url)
        foreign = await http.get(
            url, headers={"Authorization": f"Bearer {network.api_key}", "Host": "evil.example"}
        )
    assert bare.status_code == 401
    assert foreign.status_code == 403

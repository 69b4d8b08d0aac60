"""The p2pnode command as a user runs it: real processes and real output; argument
and error paths in this process (click's runner), where a process adds nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from p2pnode.tests.cli.helpers import BOUND_S, P2PNODE, Started, env, invoke, run, start


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Started]:
    started = start(tmp_path / "a", tmp_path / "a.json")
    yield started
    if started.proc.poll() is None:
        started.proc.kill()
    started.proc.communicate(timeout=BOUND_S)  # reaps it and closes its pipes


def test_start_status_and_clean_stop(node: Started, tmp_path: Path) -> None:
    ready_file = tmp_path / "a.json"
    assert node.peer_id.startswith("12D3KooW")
    assert node.addrs[0].startswith("/ip4/127.0.0.1/tcp/")
    assert node.addrs[0].endswith(f"/p2p/{node.peer_id}")

    asked = run(tmp_path / "client", "status", "--peer", node.addrs[0], "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["peer_id"] == node.peer_id
    assert answer["addrs"] == node.addrs

    human = run(tmp_path / "client", "status", "--peer", node.addrs[0])
    assert f"peer id:   {node.peer_id}" in human.stdout

    node.proc.send_signal(signal.SIGTERM)
    out, err = node.proc.communicate(timeout=BOUND_S)
    assert node.proc.returncode == 0, err
    assert "p2pnode stopped" in out
    assert not ready_file.exists()


def test_second_node_bootstraps_and_identity_persists(node: Started, tmp_path: Path) -> None:
    home = tmp_path / "b"
    second = start(home, tmp_path / "b.json", "--bootstrap", node.addrs[0])
    try:
        asked = run(tmp_path / "client", "status", "--peer", second.addrs[0], "--json")
        # The bootstrap node, and the throwaway client asking right now.
        assert json.loads(asked.stdout)["connected_peers"] == 2
    finally:
        second.proc.send_signal(signal.SIGINT)
        second.proc.communicate(timeout=BOUND_S)
    assert second.proc.returncode == 0
    shown = run(home, "id", "--json")
    assert json.loads(shown.stdout)["peer_id"] == second.peer_id


def test_port_in_use_is_one_line_and_nonzero(node: Started, tmp_path: Path) -> None:
    port = node.addrs[0].split("/tcp/")[1].split("/")[0]
    result = run(tmp_path / "c", "start", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"p2pnode: error: port {port} is already in use (/ip4/127.0.0.1/tcp/{port})"
    )


def test_unreadable_key_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "peer.key").write_bytes(b"garbage")
    (home / "peer.key").chmod(0o600)
    result = invoke(home, "start", "--listen", "/ip4/127.0.0.1/tcp/0")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("p2pnode: error: ")
    assert "not a libp2p private key" in result.stderr


def test_bad_flag_exits_nonzero(tmp_path: Path) -> None:
    result = invoke(tmp_path, "start", "--no-such-flag")
    assert result.exit_code == 2
    assert "No such option '--no-such-flag'" in result.stderr


def test_status_of_a_dead_peer_is_one_line(tmp_path: Path) -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
    result = invoke(tmp_path, "status", "--peer", dead)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("p2pnode: error: cannot connect to")
    assert "Traceback" not in result.stderr


def test_precedence_flag_over_env_over_config_file(tmp_path: Path) -> None:
    """Which layer won shows in the address the node refuses to parse."""
    home = tmp_path / "p"
    home.mkdir()
    (home / "config.toml").write_text('listen = ["/from/config"]\n')
    env = {"P2PNODE_LISTEN": "/from/env"}

    def refused(*args: str, **extra: str) -> str:
        result = invoke(home, "start", *args, **extra)
        assert result.exit_code == 2
        return result.stderr

    assert "'/from/flag'" in refused("--listen", "/from/flag", **env)
    assert "'/from/env'" in refused(**env)
    assert "'/from/config'" in refused()


def test_unknown_config_key_is_reported(tmp_path: Path) -> None:
    home = tmp_path / "k"
    home.mkdir()
    (home / "config.toml").write_text('lisen = ["/ip4/127.0.0.1/tcp/0"]\n')
    result = invoke(home, "id")
    assert result.exit_code == 2
    assert "unknown key(s): lisen" in result.stderr


def test_init_creates_identity_and_wallet(tmp_path: Path) -> None:
    home = tmp_path / "i"
    result = invoke(home, "init", P2PNODE_WALLET_PASSWORD="pass phrase")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(invoke(home, "id", "--json").stdout)
    assert f"peer id: {shown['peer_id']}" in result.stdout
    assert shown["wallet"].startswith("0x")
    assert len(shown["wallet"]) == 42
    assert (home / "config.toml").exists()
    assert oct((home / "wallet.json").stat().st_mode & 0o777) == "0o600"


def test_init_without_passphrase_source_says_how(tmp_path: Path) -> None:
    result = invoke(tmp_path / "n", "init")
    assert result.exit_code == 2
    assert "P2PNODE_WALLET_PASSWORD" in result.stderr


def test_offers_and_peers_through_the_control_socket(tmp_path: Path) -> None:
    provider = start(tmp_path / "p", tmp_path / "p.json", "--announce-model", "demo/model")
    consumer_home = tmp_path / "c"
    consumer = start(consumer_home, tmp_path / "c.json", "--bootstrap", provider.addrs[0])
    try:
        connected = json.loads(run(consumer_home, "peers", "--json").stdout)
        assert [p["peer_id"] for p in connected] == [provider.peer_id]
        assert connected[0]["connections"] == ["direct"]
        # Without --peer, status asks the running node through its socket.
        own = json.loads(run(consumer_home, "status", "--json").stdout)
        assert own["peer_id"] == consumer.peer_id
        assert (own["direct_connections"], own["relayed_connections"]) == (1, 0)
        assert "1 direct, 0 relayed" in run(consumer_home, "status").stdout
        # Gossip is asynchronous: ask until the provider's offer has arrived.
        deadline = time.monotonic() + BOUND_S
        held: list[dict[str, object]] = []
        while not held and time.monotonic() < deadline:
            result = run(consumer_home, "offers", "--model", "demo/model", "--json")
            assert result.returncode == 0, result.stderr
            held = json.loads(result.stdout)
        assert [o["peer_id"] for o in held] == [provider.peer_id]
        human = run(consumer_home, "offers").stdout
        assert "demo/model" in human
        assert json.loads(run(consumer_home, "offers", "--model", "other", "--json").stdout) == []
    finally:
        for node in (consumer, provider):
            node.proc.send_signal(signal.SIGTERM)
            node.proc.communicate(timeout=BOUND_S)
    assert not (consumer_home / "control.sock").exists()


def test_offers_without_a_running_node_says_so(tmp_path: Path) -> None:
    result = invoke(tmp_path, "offers")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("p2pnode: error: no node is running with this home")


def test_a_second_node_on_the_same_home_is_refused(node: Started, tmp_path: Path) -> None:
    result = run(tmp_path / "a", "start", "--listen", "/ip4/127.0.0.1/tcp/0")
    assert result.returncode == 2
    assert "another node is running with this home" in result.stderr


def test_simnet_writes_a_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            *P2PNODE,
            "simnet",
            "--peers",
            "6",
            "--providers",
            "2",
            "--workers",
            "2",
            "--report",
            str(report),
            "--plot",
            str(tmp_path / "figures"),
        ],
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["peers"] == 6
    assert data["providers"] == 2
    # Three nodes in each of two worker processes, steered from the command's.
    assert data["workers"] == 2
    assert data["nodes_per_worker"] == [3, 3]
    assert data["providers_per_worker"] == [1, 1]
    assert data["ready_s"] is not None
    assert data["lookup_found"]
    assert min(data["lookup_found"]) == 2
    assert all(r["delivered"] == r["of"] == 5 for r in data["offer_rounds"])
    assert all(len(r["seen_ms"]) == 5 for r in data["offer_rounds"])
    assert len(data["ready_ms"]) == 6
    assert data["errors"] == []
    # --plot: the lookups, the offers' spread and readiness, as PNGs; progress as
    # info log lines (not a terminal), which the default level keeps quiet.
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["lookup_latency.png", "offer_propagation.png", "readiness.png"]
    assert all((tmp_path / "figures" / f).stat().st_size > 10_000 for f in figures)
    assert "nodes started" not in result.stderr


def test_simnet_runs_only_discovery_over_several_workers(tmp_path: Path) -> None:
    result = run(tmp_path, "simnet", "--scenario", "market", "--workers", "2")
    assert result.returncode == 2
    assert "only the discovery scenario runs over several processes" in result.stderr


def test_bench_connect_draws_its_figure_beside_the_baseline(tmp_path: Path) -> None:
    figure = tmp_path / "connect.png"
    result = run(tmp_path, "bench", "connect", "--rounds", "3", "--rtts", "5", "--plot",
                 str(figure))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000


def test_start_serves_the_bundled_model_by_default(tmp_path: Path) -> None:
    provider = start(tmp_path / "s", tmp_path / "s.json", serve=True, P2PNODE_LOG_LEVEL="info")
    try:
        deadline = time.monotonic() + BOUND_S
        while True:
            asked = run(tmp_path / "client", "status", "--peer", provider.addrs[0], "--json")
            models = json.loads(asked.stdout)["models"]
            if models and models[0]["tokens_per_s"] > 0 or time.monotonic() > deadline:
                break
        assert [m["model_id"] for m in models] == ["SmolLM2-135M-Instruct"]
        assert models[0]["tokens_per_s"] > 0
        assert len(models[0]["gguf_sha256"]) == 64
    finally:
        provider.proc.send_signal(signal.SIGTERM)
        _, said = provider.proc.communicate(timeout=BOUND_S)
    # Its start-up work as progress: info log lines, not being on a terminal.
    assert re.search(r"loading models \[1/1, [\d.]+ s\]: SmolLM2-135M-Instruct loaded", said)
    assert re.search(r"measuring speed \[1/1, [\d.]+ s\]: SmolLM2-135M-Instruct [\d.]+ tok", said)


def test_generate_prints_text_and_speed(tmp_path: Path) -> None:
    result = run(tmp_path, "generate", "--prompt", "Say hello.", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert re.search(r"\[SmolLM2-135M-Instruct: \d+ tokens, [\d.]+ tokens/s", result.stderr)


def test_upstream_flags_are_checked(tmp_path: Path) -> None:
    result = invoke(tmp_path, "generate", "--prompt", "x", "--upstream-model", "m")
    assert result.exit_code == 2
    assert "--upstream-model needs --upstream-url" in result.stderr


def test_a_shim_beyond_loopback_needs_allow_remote_and_warns(tmp_path: Path) -> None:
    home = tmp_path / "r"
    refused = invoke(
        home, "start", "--no-serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--shim", "0.0.0.0:0"
    )
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        "p2pnode: error: the OpenAI API address 0.0.0.0:0 is reachable from other machines: "
        "listen on 127.0.0.1, or allow it explicitly with --shim-allow-remote"
    )
    allowed = start(home, tmp_path / "r.json", "--shim", "0.0.0.0:0", "--shim-allow-remote")
    try:
        assert json.loads((tmp_path / "r.json").read_text())["shim_url"].startswith("http://")
    finally:
        allowed.proc.send_signal(signal.SIGTERM)
        _, err = allowed.proc.communicate(timeout=BOUND_S)
    assert "the OpenAI API listens on 0.0.0.0:0, beyond this machine" in err


def test_quickstart_provider_consumer_shim_and_chat(tmp_path: Path) -> None:
    """The README quickstart: a provider, a consumer with the shim, curl-like calls, chat."""
    import httpx

    provider = start(tmp_path / "p", tmp_path / "p.json", serve=True)
    consumer = start(
        tmp_path / "c",
        tmp_path / "c.json",
        "--shim",
        "127.0.0.1:0",
        "--bootstrap",
        provider.addrs[0],
    )
    try:
        shim_url = json.loads((tmp_path / "c.json").read_text())["shim_url"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", shim_url)
        key_file = tmp_path / "c" / "api_key"
        assert key_file.stat().st_mode & 0o077 == 0
        key = key_file.read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }
        with httpx.Client(timeout=BOUND_S) as http:
            # The model on the network, with the sampling its provider recommends
            # (what `p2pnode chat` samples with unless told otherwise).
            (listed,) = http.get(f"{shim_url}/models", headers=headers).json()["data"]
            assert listed["owned_by"] == "network"
            assert listed["recommended_sampling"] == {"temperature": 0.2, "top_p": 0.9}
            answer = http.post(f"{shim_url}/chat/completions", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"]
            assert http.post(f"{shim_url}/chat/completions", json=body).status_code == 401
        chat = subprocess.run(
            [*P2PNODE, "chat", "--url", shim_url, "--max-tokens", "8"],
            env=env(tmp_path / "c"),
            input="Say hello.\n\n",
            capture_output=True,
            text=True,
            timeout=BOUND_S,
        )
        assert chat.returncode == 0, chat.stderr
        assert "chatting with SmolLM2-135M-Instruct" in chat.stderr
        assert chat.stdout.strip().removeprefix(">").strip()
        # The dashboard's one-time links: the one printed at start, and a new one.
        assert consumer.proc.stdout is not None
        printed = next(line for line in consumer.proc.stdout if line.startswith("dashboard: "))
        base = shim_url.removesuffix("/v1")
        asked = subprocess.run(
            [*P2PNODE, "dashboard"], env=env(tmp_path / "c"), capture_output=True, text=True,
            timeout=BOUND_S,
        )  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        for link in (printed.split(" ", 1)[1].strip(), asked.stdout.strip()):
            assert link.startswith(f"{base}/login?token=")
            with httpx.Client(timeout=BOUND_S) as http:
                assert http.get(link).status_code == 303  # a cookie, and on to the page
                assert http.get(f"{base}/").status_code == 200
                assert http.get(link).status_code == 401  # good once
    finally:
        for started in (consumer, provider):
            started.proc.send_signal(signal.SIGTERM)
            started.proc.communicate(timeout=BOUND_S)


def test_demo_runs_a_paid_network_in_one_process(tmp_path: Path) -> None:
    """What ./dev start runs: embedded chain, provider, consumer with the shim; paid chat."""
    import httpx

    ready = tmp_path / "demo.json"
    proc = subprocess.Popen(
        [*P2PNODE, "demo", "--shim", "127.0.0.1:0", "--ready-file", str(ready)],
        env=env(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("p2pnode demo ready"):
                break
        else:
            pytest.fail(f"demo did not start: {proc.stderr.read() if proc.stderr else ''}")
        url = json.loads(ready.read_text())["shim_url"]
        key = (tmp_path / "home" / "api_key").read_text().strip()
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}
        answer = httpx.post(
            f"{url}/chat/completions",
            json={**body, "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=BOUND_S,
        )
        assert answer.status_code == 200, answer.text
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 0, err
    settled = re.search(
        r"settled on chain: ([\d.]+) tokens? escrowed, ([\d.]+) tokens? paid to providers, "
        r"([\d.]+) tokens? refunded \(1 session opened, 1 closed in this run\)",
        out,
    )
    assert settled, out
    escrowed, paid, refunded = (Decimal(settled.group(i)) for i in (1, 2, 3))
    # A session opened and closed within one block second pays nothing: >= 0.
    assert escrowed > 0
    assert paid >= 0
    assert paid + refunded == escrowed  # exact amounts: they add up to the last unit
    assert "still in escrow" not in out


def test_json_logs_at_debug_carry_no_prompt_output_or_key(tmp_path: Path) -> None:
    """Both nodes of a chat log at debug level, as JSON: every line parses, names
    its node, and none holds the prompt, the answer, the API key or a private key."""
    import base64

    import httpx

    def node(name: str, *args: str) -> tuple[subprocess.Popen[str], Path, dict[str, object]]:
        log, ready = tmp_path / f"{name}.log", tmp_path / f"{name}.json"
        environment = {
            **env(tmp_path / name), "P2PNODE_LOG_LEVEL": "debug", "P2PNODE_LOG_FORMAT": "json"
        }  # fmt: skip
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [*P2PNODE, "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--ready-file", str(ready),
                 *args],
                env=environment, stdout=subprocess.PIPE, stderr=sink, text=True,
            )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("p2pnode") and "ready" in line:
                break
        else:
            pytest.fail(f"node did not start: {log.read_text()[-2000:]}")
        return proc, log, json.loads(ready.read_text())

    prompt = "Tell me about the quokka called Zanzibar Marmalade."
    provider, provider_log, started = node("p")
    addr = started["addrs"][0]  # type: ignore[index]
    consumer, consumer_log, ready = node(
        "c", "--no-serve", "--shim", "127.0.0.1:0", "--bootstrap", str(addr)
    )
    try:
        key = (tmp_path / "c" / "api_key").read_text().strip()
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        with httpx.Client(timeout=BOUND_S) as http:
            answer = http.post(
                f"{ready['shim_url']}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
        assert answer.status_code == 200, answer.text
        output = answer.json()["choices"][0]["message"]["content"]
    finally:
        for proc in (consumer, provider):
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=BOUND_S)
    secrets = [prompt, "Zanzibar", "quokka", key]
    secrets += [s for s in output.split(". ") if len(s) >= 12]  # the answer, a sentence at a time
    for home in (tmp_path / "p", tmp_path / "c"):
        raw = (home / "peer.key").read_bytes()
        secrets += [raw.hex(), base64.b64encode(raw).decode()]
    for log, home in ((provider_log, "p"), (consumer_log, "c")):
        lines = log.read_text().splitlines()
        assert len(lines) > 20  # debug level: much was logged
        records = [json.loads(line) for line in lines]  # every line is JSON
        assert all(
            {"ts", "level", "logger", "event", "message", "node"} <= r.keys() for r in records
        )
        assert any(r["level"] == "debug" for r in records)
        assert any(r["node"] for r in records)
        text = log.read_text()
        for secret in secrets:
            assert secret not in text, (home, secret[:20])


def test_keys_add_list_revoke(tmp_path: Path) -> None:
    """A team's keys: made with their limits, shown once, listed, revoked."""
    added = invoke(tmp_path, "keys", "add", "alice", "--spend-limit", "2.5", "--rate-limit", "30")
    assert added.exit_code == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("sk-p2pnode-")
    assert "not shown again" in added.stderr
    assert invoke(tmp_path, "keys", "add", "bob").exit_code == 0
    again = invoke(tmp_path, "keys", "add", "alice")
    assert again.exit_code != 0
    assert "already" in again.stderr
    listed = invoke(tmp_path, "keys", "list")
    assert re.search(r"alice\s+active\s+0 requests.*spend limit 2\.5 tokens, 30 requests/min",
                     listed.stdout), listed.stdout  # fmt: skip
    assert invoke(tmp_path, "keys", "revoke", "alice").exit_code == 0
    (alice, bob) = json.loads(invoke(tmp_path, "keys", "list", "--json").stdout)
    assert (alice["name"], alice["revoked"], alice["spend_limit"]) == ("alice", True, 25 * 10**17)
    assert (bob["name"], bob["revoked"], bob["spend_limit"]) == ("bob", False, None)
    assert key not in (tmp_path / "keys.json").read_text()

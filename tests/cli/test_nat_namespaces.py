"""A private provider behind a real NAT, in network namespaces this test makes.

    ns "pub"  10.77.0.2 ── relay node (--relay-service) and a consumer with the shim
        │ veth
    ns "nat"  10.77.0.1 / 192.168.77.1, forwarding, nftables masquerade toward pub
        │ veth
    ns "priv" 192.168.77.2 ── provider serving the bundled model

"pub" has no route to 192.168.77.0/24: the provider can dial out (masqueraded
as 10.77.0.1) but nobody can dial in. Its dial-back check must find it
private (the relay sees it come from 10.77.0.1 and will not dial another IP);
it then reserves on the relay and is served through it. Every packet stays in
the three namespaces, which the test removes. Skipped, saying why, where
namespaces or nftables are not available (not root, no iproute2/nftables).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import BOUND_S, P2PNODE, _env

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def _sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30, input=stdin, text=True)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("needs iproute2 and nftables (./dev setup installs them as root)")
    tag = uuid.uuid4().hex[:6]
    ns = {"pub": f"p2p-pub-{tag}", "nat": f"p2p-nat-{tag}", "priv": f"p2p-priv-{tag}"}
    try:
        for name in ns.values():
            _sh("ip", "netns", "add", name)
    except subprocess.CalledProcessError as exc:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    pub, nat, priv = ns["pub"], ns["nat"], ns["priv"]

    def in_ns(name: str, *args: str) -> None:
        _sh("ip", "netns", "exec", name, *args)

    try:
        for near, far, a, b in ((pub, nat, "a", "b"), (nat, priv, "c", "d")):
            _sh("ip", "link", "add", f"{a}{tag}", "netns", near, "type", "veth",
                "peer", f"{b}{tag}", "netns", far)  # fmt: skip
        for name in ns.values():
            in_ns(name, "ip", "link", "set", "lo", "up")
        in_ns(pub, "ip", "addr", "add", "10.77.0.2/24", "dev", f"a{tag}")
        in_ns(pub, "ip", "link", "set", f"a{tag}", "up")
        in_ns(nat, "ip", "addr", "add", "10.77.0.1/24", "dev", f"b{tag}")
        in_ns(nat, "ip", "addr", "add", "192.168.77.1/24", "dev", f"c{tag}")
        in_ns(nat, "ip", "link", "set", f"b{tag}", "up")
        in_ns(nat, "ip", "link", "set", f"c{tag}", "up")
        in_ns(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(priv, "ip", "addr", "add", "192.168.77.2/24", "dev", f"d{tag}")
        in_ns(priv, "ip", "link", "set", f"d{tag}", "up")
        in_ns(priv, "ip", "route", "add", "default", "via", "192.168.77.1")
        # Masquerade toward pub; nothing from pub may open a connection into
        # priv: only replies to what priv started pass.
        ruleset = f"""
table ip nat {{
    chain post {{
        type nat hook postrouting priority 100;
        oifname "b{tag}" masquerade
    }}
}}
table ip filter {{
    chain guard {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "c{tag}" accept
    }}
}}
"""
        _sh("ip", "netns", "exec", nat, "nft", "-f", "-", stdin=ruleset)
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _node(ns: str, home: Path, ready: Path, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *P2PNODE, "start", "--ready-file", str(ready), *args],
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + BOUND_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"node in {ns} did not start: {err[-2000:]}")
        time.sleep(0.1)  # noqa: TID251 - a synchronous test waiting on processes
    return proc


def test_a_provider_behind_nat_is_found_private_and_served_through_a_relay(
    namespaces: dict[str, str], tmp_path: Path
) -> None:
    pub, priv = namespaces["pub"], namespaces["priv"]
    procs: list[subprocess.Popen[str]] = []
    try:
        relay = _node(
            pub, tmp_path / "relay", tmp_path / "relay.json",
            "--listen", "/ip4/10.77.0.2/tcp/4001", "--no-serve", "--relay-service",
            "--reachability", "public",
        )  # fmt: skip
        procs.append(relay)
        relay_addr = json.loads((tmp_path / "relay.json").read_text())["addrs"][0]
        consumer = _node(
            pub, tmp_path / "consumer", tmp_path / "consumer.json",
            "--listen", "/ip4/10.77.0.2/tcp/4002", "--no-serve", "--bootstrap", relay_addr,
            "--shim", "127.0.0.1:0", "--reachability", "public",
        )  # fmt: skip
        procs.append(consumer)
        provider = _node(
            priv, tmp_path / "provider", tmp_path / "provider.json",
            "--listen", "/ip4/192.168.77.2/tcp/4001", "--bootstrap", relay_addr,
            "--relay", relay_addr, "--reachability-first-s", "1",
        )  # fmt: skip
        procs.append(provider)
        provider_id = json.loads((tmp_path / "provider.json").read_text())["peer_id"]
        # The consumer learns the provider's offer: only a circuit address.
        deadline = time.monotonic() + 2 * BOUND_S
        addrs: list[str] = []
        while time.monotonic() < deadline:
            asked = subprocess.run(
                [*P2PNODE, "offers", "--json"], env=_env(tmp_path / "consumer"),
                capture_output=True, text=True, timeout=BOUND_S,
            )  # fmt: skip
            held = json.loads(asked.stdout or "[]") if asked.returncode == 0 else []
            mine = [o for o in held if o["peer_id"] == provider_id]
            addrs = mine[0]["addrs"] if mine else []
            if addrs and all("/p2p-circuit/" in a for a in addrs):
                break
            time.sleep(0.5)  # noqa: TID251 - a synchronous test waiting on processes
        assert addrs, "the consumer never saw the provider's offer"
        assert all(a.startswith(relay_addr + "/p2p-circuit/") for a in addrs), addrs
        # A chat through the consumer's shim, run inside "pub" (where it listens).
        shim = json.loads((tmp_path / "consumer.json").read_text())["shim_url"]
        key = (tmp_path / "consumer" / "api_key").read_text().strip()
        client = (
            "import json, sys, httpx\n"
            f"r = httpx.post({shim!r} + '/chat/completions', timeout=60, "
            f"headers={{'Authorization': 'Bearer {key}'}}, json={{'model': {MODEL!r}, "
            "'messages': [{'role': 'user', 'content': 'Say hello.'}], 'max_tokens': 8})\n"
            "print(r.status_code); print(r.text)\n"
        )
        chat = subprocess.run(
            ["ip", "netns", "exec", pub, sys.executable, "-c", client],
            capture_output=True, text=True, timeout=2 * BOUND_S,
        )  # fmt: skip
        status, _, body = chat.stdout.partition("\n")
        assert status == "200", chat.stdout + chat.stderr
        assert json.loads(body)["choices"][0]["message"]["content"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.communicate(timeout=BOUND_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()

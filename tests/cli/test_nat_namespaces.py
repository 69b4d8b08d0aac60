"""Two private nodes behind two real NATs, in network namespaces this test makes.

                         ns "pub" ── relay node (--relay-service)
              10.77.0.2 ╱         ╲ 10.77.1.2      (routes between the NATs)
    ns "nat1" 10.77.0.1            10.77.1.1 ns "nat2"
    masquerade, guard              masquerade, guard
    192.168.77.1                   192.168.78.1
         │                              │
    ns "priv1" 192.168.77.2        ns "priv2" 192.168.78.2
    provider (bundled model)       consumer with the shim

Each NAT masquerades its private side and lets nothing in that its side did
not start (nftables ``ct state established,related``), and drops what else
reaches it from outside. Nobody can dial a private node. The provider's
dial-back check finds it private on its own; it reserves on the relay, and
the consumer reaches it through the relay. Then the consumer upgrades the
relayed connection by DCUtR: both sides dial each other from their listen
ports at once, each NAT sees its own side's SYN go out first and lets the
other side's in (TCP simultaneous open). A second chat runs over the direct
connection. Every packet stays in the five namespaces, which the test
removes. Skipped, saying why, where namespaces or nftables are
not available (not root, no iproute2/nftables).
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

from p2pnode.tests.cli.helpers import BOUND_S, P2PNODE
from p2pnode.tests.cli.helpers import env as _env

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
    ns = {name: f"p2p-{name}-{tag}" for name in ("pub", "nat1", "priv1", "nat2", "priv2")}
    try:
        for name in ns.values():
            _sh("ip", "netns", "add", name)
    except subprocess.CalledProcessError as exc:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")

    def in_ns(name: str, *args: str) -> None:
        _sh("ip", "netns", "exec", ns[name], *args)

    def link(near: str, near_addr: str, far: str, far_addr: str, n: int) -> None:
        a, b = f"v{n}a{tag}", f"v{n}b{tag}"
        _sh("ip", "link", "add", a, "netns", ns[near], "type", "veth", "peer", b, "netns", ns[far])
        for name, dev, addr in ((near, a, near_addr), (far, b, far_addr)):
            in_ns(name, "ip", "addr", "add", addr, "dev", dev)
            in_ns(name, "ip", "link", "set", dev, "up")

    try:
        for name in ns:
            in_ns(name, "ip", "link", "set", "lo", "up")
        link("pub", "10.77.0.2/24", "nat1", "10.77.0.1/24", 0)
        link("pub", "10.77.1.2/24", "nat2", "10.77.1.1/24", 1)
        link("nat1", "192.168.77.1/24", "priv1", "192.168.77.2/24", 2)
        link("nat2", "192.168.78.1/24", "priv2", "192.168.78.2/24", 3)
        in_ns("pub", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for nat, up, private, out in (
            ("nat1", "10.77.0.2", "priv1", f"v0b{tag}"),
            ("nat2", "10.77.1.2", "priv2", f"v1b{tag}"),
        ):
            in_ns(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            in_ns(nat, "ip", "route", "add", "default", "via", up)
            gateway = "192.168.77.1" if nat == "nat1" else "192.168.78.1"
            in_ns(private, "ip", "route", "add", "default", "via", gateway)
            # Masquerade outward; from outside, only replies to what the
            # private side started pass (a home router's stateful NAT), and
            # the router drops what else reaches it on its outer side, as
            # most do. (A NAT that answers a stray SYN with a reset kills the
            # other side's half-open punch: DCUtR fails there, as it does
            # behind such NATs in the wild, and the relay carries on.)
            ruleset = f"""
table ip nat {{
    chain post {{
        type nat hook postrouting priority 100;
        oifname "{out}" masquerade
    }}
}}
table ip filter {{
    chain guard {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname != "{out}" accept
    }}
    chain wan {{
        type filter hook input priority 0; policy accept;
        iifname "{out}" ct state new drop
    }}
}}
"""
            _sh("ip", "netns", "exec", ns[nat], "nft", "-f", "-", stdin=ruleset)
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


def _ask(home: Path, *args: str) -> object:
    asked = subprocess.run(
        [*P2PNODE, *args, "--json"], env=_env(home), capture_output=True, text=True, timeout=BOUND_S
    )
    return json.loads(asked.stdout) if asked.returncode == 0 and asked.stdout else None


def _chat(ns: str, shim: str, key: str) -> str:
    """One chat through the consumer's shim, from inside its namespace."""
    client = (
        "import json, sys, httpx\n"
        f"r = httpx.post({shim!r} + '/chat/completions', timeout=60, "
        f"headers={{'Authorization': 'Bearer {key}'}}, json={{'model': {MODEL!r}, "
        "'messages': [{'role': 'user', 'content': 'Say hello.'}], "
        "'max_tokens': 8, 'temperature': 0})\n"
        "print(r.status_code); print(r.text)\n"
    )
    chat = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", client],
        capture_output=True, text=True, timeout=2 * BOUND_S,
    )  # fmt: skip
    status, _, body = chat.stdout.partition("\n")
    assert status == "200", chat.stdout + chat.stderr
    text = json.loads(body)["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    assert text
    return text


def test_private_nodes_behind_nats_meet_through_a_relay_and_punch_a_hole(
    namespaces: dict[str, str], tmp_path: Path
) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        relay = _node(
            namespaces["pub"], tmp_path / "relay", tmp_path / "relay.json",
            "--listen", "/ip4/10.77.0.2/tcp/4001", "--no-serve", "--relay-service",
            "--reachability", "public",
        )  # fmt: skip
        procs.append(relay)
        relay_addr = json.loads((tmp_path / "relay.json").read_text())["addrs"][0]
        provider = _node(
            namespaces["priv1"], tmp_path / "provider", tmp_path / "provider.json",
            "--listen", "/ip4/192.168.77.2/tcp/4001", "--bootstrap", relay_addr,
            "--relay", relay_addr, "--reachability-first-s", "1",
        )  # fmt: skip
        procs.append(provider)
        provider_id = json.loads((tmp_path / "provider.json").read_text())["peer_id"]
        consumer_home = tmp_path / "consumer"
        consumer = _node(
            namespaces["priv2"], consumer_home, tmp_path / "consumer.json",
            "--listen", "/ip4/192.168.78.2/tcp/4002", "--no-serve", "--bootstrap", relay_addr,
            "--relay", relay_addr, "--reachability", "private", "--shim", "127.0.0.1:0",
        )  # fmt: skip
        procs.append(consumer)
        # The provider found itself private and offers only its relayed address.
        deadline = time.monotonic() + 2 * BOUND_S
        addrs: list[str] = []
        while time.monotonic() < deadline:
            held = _ask(consumer_home, "offers") or []
            assert isinstance(held, list)
            mine = [o for o in held if o["peer_id"] == provider_id]
            addrs = mine[0]["addrs"] if mine else []
            if addrs and all("/p2p-circuit/" in a for a in addrs):
                break
            time.sleep(0.5)  # noqa: TID251 - a synchronous test waiting on processes
        assert addrs, "the consumer never saw the provider's offer"
        assert all(a.startswith(relay_addr + "/p2p-circuit/") for a in addrs), addrs
        shim = json.loads((tmp_path / "consumer.json").read_text())["shim_url"]
        key = (consumer_home / "api_key").read_text().strip()
        first = _chat(namespaces["priv2"], shim, key)
        # The relayed connection is upgraded: a direct one through both NATs.
        links: list[str] = []
        while time.monotonic() < deadline:
            peers = _ask(consumer_home, "peers") or []
            assert isinstance(peers, list)
            links = next((p["connections"] for p in peers if p["peer_id"] == provider_id), [])
            if links == ["direct"]:
                break
            time.sleep(0.5)  # noqa: TID251 - a synchronous test waiting on processes
        assert links == ["direct"], links
        status = _ask(consumer_home, "status")
        assert isinstance(status, dict)
        assert status["upgraded_connections"] == 1
        assert status["relays"]  # the private consumer holds its own reservation
        # Same greedy request, same answer, now without the relay.
        assert _chat(namespaces["priv2"], shim, key) == first
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

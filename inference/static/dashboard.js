// The p2pnode dashboard (docs/architecture.md#the-dashboard). Everything shown
// comes from /dashboard/state, strangers' offers among it: values are written
// with textContent, never as markup.
"use strict";

const POLL_MS = 2000;
const HEADERS = { "x-p2pnode-dashboard": "1" };
let last = null; // the previous state's token counts and when they were read

function $(id) { return document.getElementById(id); }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  td.title = td.textContent;
  return td;
}

function fill(table, rows, empty) {
  const body = table.querySelector("tbody");
  const cols = table.querySelectorAll("thead th").length;
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = cols;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = document.createElement("tr");
    tr.append(...cells);
    body.append(tr);
  }
}

function short(id) {
  const s = String(id || "");
  return s.length > 16 ? s.slice(0, 8) + "…" + s.slice(-6) : s;
}

function duration(s) {
  s = Math.floor(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function tokens(wei) {
  // Token amounts in the smallest unit (18 decimals), shown in whole tokens.
  if (wei === null || wei === undefined || wei === "") return "";
  const n = Number(wei) / 1e18;
  return n === 0 ? "0" : n.toPrecision(3);
}

function price(model, paid) {
  if (paid && !(model.price_per_s && model.bid_id)) return "no bid";
  return model.price_per_s ? tokens(model.price_per_s) + " /s" : "free";
}

function showNode(node) {
  $("peer-id").textContent = node.peer_id;
  $("version").textContent = node.version;
  const reach = $("reachability");
  reach.textContent = node.reachability;
  reach.className = node.reachability === "public" ? "ok" : node.reachability === "private" ? "warn" : "";
  $("uptime").textContent = duration(node.uptime_s);
  $("wallet").textContent = node.wallet || "free mode";
  $("relays").textContent = node.relays.length ? node.relays.map(short).join(", ") : "none";
  $("serving").textContent = node.models.length ? node.models.map((m) => m.model_id).join(", ") : "nothing";
  $("peers").textContent = node.connected_peers;
  $("links").textContent =
    `${node.direct_connections} / ${node.relayed_connections} / ${node.upgraded_connections}`;
}

function showProviders(answer) {
  const rows = [];
  for (const o of answer.offers) {
    const audits = o.audits || {};
    const auditText = audits.caught ? "caught: " + audits.caught
      : audits.audits ? `${audits.passed}/${audits.audits} passed` : "none yet";
    const conduct = o.banned ? "banned" : o.score > 0 ? "score " + o.score.toFixed(1) : "clean";
    const rtt = o.measured && o.measured.rtt_ms !== null ? o.measured.rtt_ms.toFixed(0) + " ms" : "not measured";
    for (const m of o.models) {
      const measured = o.measured && o.measured.tokens_per_s;
      const speed = (measured ? measured : m.tokens_per_s).toFixed(1) + " tok/s" + (measured ? "" : " (claimed)");
      rows.push([
        cell(short(o.peer_id)), cell(m.model_id), cell(price(m, answer.paid)),
        cell(`${o.slots_free} free, ${o.queue_len} queued`), cell(rtt), cell(speed),
        cell(auditText, audits.caught ? "bad" : audits.audits ? "ok" : ""),
        cell(conduct, o.banned ? "bad" : o.score > 0 ? "warn" : "ok"),
      ]);
    }
  }
  const total = answer.total === undefined ? answer.offers.length : answer.total;
  $("providers-count").textContent = total > answer.offers.length
    ? `(${answer.offers.length} of ${total}, cheapest first)` : `(${total})`;
  fill($("providers"), rows, "no offers heard yet");
}

function showConnections(peers) {
  const rows = peers.map((p) => {
    const kinds = p.connections.join(", ") || "-";
    return [cell(short(p.peer_id)), cell(kinds, p.connections.includes("relayed") ? "relayed" : "direct"),
      cell(p.addrs[0] || "")];
  });
  $("connections-count").textContent = `(${peers.length})`;
  fill($("connections"), rows, "not connected");
}

function showSessions(sessions) {
  const rows = sessions.held.map((s) => [
    cell(short(s.peer_id)), cell(s.model_id), cell(s.paid ? "held (paid)" : "held (free)", "ok"),
    cell(""), cell(s.served ? "answered" : ""),
  ]);
  for (const s of sessions.paid) {
    const receipt = s.requests === null ? "none"
      : `${s.requests} req, ${s.completion_tokens} tok${s.signed ? ", signed" : ""}`;
    const spent = s.state === "closed" ? tokens(s.paid) : "≤ " + tokens(s.stake);
    rows.push([cell(short(s.peer_id)), cell(s.role), cell(s.state), cell(spent), cell(receipt)]);
  }
  fill($("sessions"), rows, "no sessions yet");
}

function showKeys(keys) {
  $("keys-section").hidden = keys.length === 0;
  const rows = keys.map((k) => {
    const limits = [];
    if (k.spend_limit !== null) limits.push("spend ≤ " + tokens(k.spend_limit));
    if (k.rate_limit !== null) limits.push(k.rate_limit + " req/min");
    return [cell(k.name), cell(k.revoked ? "revoked" : "active", k.revoked ? "bad" : "ok"),
      cell(k.requests), cell(`${k.prompt_tokens} + ${k.completion_tokens}`),
      cell(tokens(k.spent_wei)), cell(limits.join(", ") || "none")];
  });
  $("keys-count").textContent = `(${keys.length})`;
  fill($("keys"), rows, "");
}

function showRates(state) {
  const now = performance.now();
  if (last !== null) {
    const dt = (now - last.at) / 1000;
    $("tps-in").textContent = Math.max(0, (state.tokens.consumed - last.consumed) / dt).toFixed(1);
    $("tps-out").textContent = Math.max(0, (state.tokens.served - last.served) / dt).toFixed(1);
  }
  last = { at: now, consumed: state.tokens.consumed, served: state.tokens.served };
  $("requests").textContent = state.requests;
}

async function refresh() {
  try {
    const answer = await fetch("/dashboard/state", { headers: HEADERS });
    if (!answer.ok) throw new Error(`the node answered ${answer.status}`);
    const state = await answer.json();
    showNode(state.node);
    showProviders(state.providers);
    showConnections(state.connections);
    showSessions(state.sessions);
    showKeys(state.keys || []);
    showRates(state);
    $("error").hidden = true;
    document.body.dataset.loaded = "yes";
  } catch (err) {
    $("error").textContent = "cannot read the node's state: " + err.message;
    $("error").hidden = false;
  }
}

async function loadModels() {
  const answer = await fetch("/v1/models", { headers: HEADERS });
  if (!answer.ok) return;
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren();
  for (const m of (await answer.json()).data) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${m.owned_by})`;
    select.append(option);
  }
  if (chosen) select.value = chosen;
}

function turn(who, text) {
  const div = document.createElement("div");
  div.className = "turn " + who;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("chat-log").append(div);
  return div;
}

async function chat(event) {
  event.preventDefault();
  const prompt = $("chat-input").value.trim();
  const model = $("chat-model").value;
  if (!prompt || !model) return;
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  turn("user", prompt);
  const answer = turn("assistant", "");
  const text = answer.querySelector(".text");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...HEADERS, "content-type": "application/json" },
      body: JSON.stringify({ model, stream: true, max_tokens: 128,
        messages: [{ role: "user", content: prompt }] }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `status ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) text.textContent += choice.delta.content;
          }
        }
      }
    }
    answer.dataset.done = "yes";
  } catch (err) {
    answer.classList.add("failed");
    text.textContent += (text.textContent ? "\n" : "") + "[failed: " + err.message + "]";
    answer.dataset.done = "failed";
  } finally {
    $("chat-send").disabled = false;
    refresh();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", chat);
  refresh();
  loadModels();
  setInterval(refresh, POLL_MS);
  setInterval(loadModels, POLL_MS * 5);
});

// The chat page: sign in with a user key, stream the agent's answers, act on cards,
// see and edit the history, export the adapter, delete yourself. Plain DOM, no build step.
"use strict";

const state = { key: sessionStorage.getItem("llmrec-key"), conversation: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);  // strings become text nodes: never HTML
  return node;
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.key}`, ...(options.headers || {}) };
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function setStatus(text) { $("status").textContent = text; }

// ----------------------------------------------------------------- sign in / out

async function signIn(key) {
  state.key = key;
  try {
    const view = await (await api("/v1/me/history")).json();
    sessionStorage.setItem("llmrec-key", key);
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = `signed in as ${view.user}`;
    renderHistory(view);
    $("ask").focus();
  } catch (err) {
    signOut();
    $("sign-in-error").textContent =
      err.status === 401 ? "That key is not valid." : `Sign-in failed: ${err.message}`;
  }
}

function signOut() {
  sessionStorage.removeItem("llmrec-key");
  state.key = null;
  state.conversation = null;
  $("messages").replaceChildren();
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("who").textContent = "";
}

// ----------------------------------------------------------------- history panel

function renderHistory(view) {
  $("history").replaceChildren(...view.history.map((item) =>
    el("li", { "data-item": item.item_id }, item.title,
      el("button", { title: "Remove from my history", onclick: () => removeFromHistory(item) }, "remove"))));
  $("exclusions").replaceChildren(...view.exclusions.map((item) =>
    el("li", { "data-item": item.item_id }, item.title,
      el("button", { title: "Allow it again", onclick: () => allowAgain(item) }, "allow"))));
  $("queued").hidden = !view.refresh_queued;
}

async function refreshHistory() {
  renderHistory(await (await api("/v1/me/history")).json());
}

async function removeFromHistory(item) {
  const body = JSON.stringify({ remove: [item.item_id] });
  renderHistory(await (await api("/v1/me/history", { method: "POST", body })).json());
}

async function allowAgain(item) {
  const body = JSON.stringify({ remove: [item.item_id] });
  renderHistory(await (await api("/v1/me/exclusions", { method: "POST", body })).json());
}

// ----------------------------------------------------------------- chat

function addMessage(role, text) {
  const node = el("div", { class: `msg ${role}`, "data-role": role }, text);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function renderCards(cards) {
  const box = el("div", { class: "cards", "data-testid": "cards" });
  for (const card of cards) {
    const meta = [card.year, card.genres.join(", ")].filter(Boolean).join(" · ");
    const node = el("article", { class: "card", "data-item": card.item_id, "data-testid": "card" },
      el("h3", {}, card.title),
      el("div", { class: "meta" }, meta),
      el("p", { class: "reason" }, card.reason));
    // A reason from facts already names its history items: list only the ones it does not.
    const unnamed = card.because.filter((title) => !card.reason.includes(title));
    if (unnamed.length) {
      node.append(el("p", { class: "because" }, `From your history: ${unnamed.join(", ")}`));
    }
    const act = (action) => async () => {
      const body = JSON.stringify({ item_id: card.item_id, action });
      renderHistory(await (await api("/v1/me/feedback", { method: "POST", body })).json());
      node.classList.add("done");
      node.dataset.feedback = action;
      setStatus({ up: `Liked ${card.title}.`, down: `You won't see ${card.title} again.`,
                  forget: `Forgot ${card.title}.` }[action]);
    };
    node.append(el("div", { class: "actions" },
      el("button", { title: "I like it", "data-action": "up", onclick: act("up") }, "Like"),
      el("button", { title: "Not for me", "data-action": "down", onclick: act("down") }, "Dislike"),
      el("button", { title: "Never show it again", "data-action": "forget", onclick: act("forget") },
        "forget this")));
    box.append(node);
  }
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
}

async function ask(message) {
  addMessage("user", message);
  const answer = addMessage("assistant", "…");
  answer.dataset.streaming = "true";
  let text = "";
  try {
    const body = JSON.stringify({ message, conversation_id: state.conversation });
    const response = await api("/v1/agent/chat", { method: "POST", body });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!frame.startsWith("data: ")) continue;
        const event = JSON.parse(frame.slice(6));
        if (event.type === "conversation") state.conversation = event.conversation_id;
        else if (event.type === "text") { text += event.text; answer.textContent = text; }
        else if (event.type === "cards") renderCards(event.cards);
        else if (event.type === "action") refreshHistory();
        else if (event.type === "error") { answer.classList.add("error"); answer.textContent = event.text; }
        else if (event.type === "done") answer.textContent = event.text || text;
      }
    }
  } catch (err) {
    answer.classList.add("error");
    answer.textContent = `Sorry: ${err.message}`;
  } finally {
    delete answer.dataset.streaming;
    answer.dataset.done = "true";
  }
}

// ----------------------------------------------------------------- export / delete

async function exportAdapter() {
  try {
    const response = await api("/v1/me/adapter");
    const blob = await response.blob();
    const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
    const link = el("a", { href: URL.createObjectURL(blob), download: name ? name[1] : "adapter.zip" });
    document.body.append(link);
    link.click();
    link.remove();
    setStatus("Your adapter was downloaded (PEFT folder + manifest, as a zip).");
  } catch (err) {
    setStatus(err.status === 404 ? "You have no personal adapter yet." : `Export failed: ${err.message}`);
  }
}

async function deleteMe() {
  if (!confirm("Delete your history, conversations, personal adapters and keys? This cannot be undone.")) return;
  try {
    await api("/v1/me", { method: "DELETE" });
    signOut();
    $("sign-in-error").textContent = "Your data and keys were deleted.";
  } catch (err) {
    setStatus(`Delete failed: ${err.message}`);
  }
}

// ----------------------------------------------------------------- wiring

$("sign-in-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("key").value.trim()); });
$("sign-out").addEventListener("click", signOut);
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const message = $("ask").value.trim();
  if (message) { $("ask").value = ""; ask(message); }
});
$("export").addEventListener("click", exportAdapter);
$("delete").addEventListener("click", deleteMe);
if (state.key) signIn(state.key);

// kfoundry chat page: plain JavaScript, no build step.
// It talks to the same server's OpenAI-compatible API (/v1/chat/completions with stream: true) and reads the
// server-sent events as they arrive. The whole conversation is sent each turn (the API is stateless), with the
// system prompt first. Text is inserted with textContent, never as HTML, so model output cannot inject markup.
"use strict";

const STRINGS = {
  ko: {
    title: "채팅", newChat: "새 대화", settings: "설정", system: "시스템 프롬프트",
    systemPlaceholder: "예: 당신은 친절한 한국어 도우미입니다.", temperature: "온도", maxTokens: "최대 토큰",
    apiKey: "API 키", apiKeyPlaceholder: "서버에 키가 설정된 경우에만", empty: "메시지를 입력해 대화를 시작하세요.",
    inputPlaceholder: "메시지를 입력하세요 (Enter: 보내기, Shift+Enter: 줄바꿈)", send: "보내기", stop: "중지",
    otherLang: "English", generating: "답변 생성 중…", stopped: "중지했습니다.", done: "완료 ({n} 토큰)",
    needKey: "API 키가 필요합니다. 설정에서 입력하세요.", error: "오류: {msg}", offline: "서버에 연결할 수 없습니다.",
  },
  en: {
    title: "chat", newChat: "New chat", settings: "Settings", system: "System prompt",
    systemPlaceholder: "e.g. You are a helpful assistant.", temperature: "Temperature", maxTokens: "Max tokens",
    apiKey: "API key", apiKeyPlaceholder: "only if the server requires one", empty: "Type a message to start.",
    inputPlaceholder: "Type a message (Enter: send, Shift+Enter: new line)", send: "Send", stop: "Stop",
    otherLang: "한국어", generating: "Generating…", stopped: "Stopped.", done: "Done ({n} tokens)",
    needKey: "An API key is required: enter it in Settings.", error: "Error: {msg}", offline: "Cannot reach the server.",
  },
};

const $ = (id) => document.getElementById(id);
function initialLanguage() {
  const saved = localStorage.getItem("kfoundry.lang");
  if (saved === "ko" || saved === "en") return saved;
  return (navigator.language || "ko").toLowerCase().startsWith("ko") ? "ko" : "en";
}

const state = {
  lang: initialLanguage(),
  history: [],      // [{role, content}] of finished turns
  model: null,
  controller: null, // AbortController of the running request
};

function t(key, vars = {}) {
  return STRINGS[state.lang][key].replace(/\{(\w+)\}/g, (_, k) => vars[k]);
}

function applyLanguage() {
  document.documentElement.lang = state.lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("otherLang");
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function addMessage(role, text) {
  $("empty").hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) { setStatus(t("needKey"), true); return; }
    const body = await r.json();
    state.model = body.data[0].id;
    $("model").textContent = `${state.model} · ctx ${body.data[0].context_length}`;
    setStatus("");
  } catch (e) {
    setStatus(t("offline"), true);
  }
}

// Split a server-sent-event stream into the JSON payloads of its `data:` lines.
function* ssePayloads(buffer) {
  for (const event of buffer) {
    for (const line of event.split("\n")) {
      if (line.startsWith("data:")) yield line.slice(5).trim();
    }
  }
}

async function send(text) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.dataset.state = "streaming";
  setBusy(true);
  setStatus(t("generating"));

  state.controller = new AbortController();
  let answer = "";
  let tokens = 0;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model, messages, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const events = pending.split("\n\n");
      pending = events.pop(); // an incomplete event waits for the next read
      for (const data of ssePayloads(events)) {
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) tokens = msg.usage.completion_tokens;
        for (const choice of msg.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            out.textContent = answer;
            out.scrollIntoView({ block: "end" });
          }
        }
      }
    }
    out.dataset.state = "done";
    setStatus(t("done", { n: tokens }));
  } catch (e) {
    if (e.name === "AbortError") {
      out.dataset.state = "done";
      setStatus(t("stopped"));
    } else {
      out.dataset.state = "error";
      if (!answer) out.textContent = t("error", { msg: e.message });
      setStatus(t("error", { msg: e.message }), true);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  // Keep the turn (a stopped one too) so the next message continues this conversation; drop a failed one.
  if (out.dataset.state !== "error") {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
  if (!busy) $("input").focus();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  document.querySelectorAll(".msg").forEach((el) => el.remove());
  $("empty").hidden = false;
  setStatus("");
}

function init() {
  applyLanguage();
  $("api-key").value = sessionStorage.getItem("kfoundry.apiKey") || "";
  $("system").value = localStorage.getItem("kfoundry.system") || "";
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "ko" ? "en" : "ko";
    localStorage.setItem("kfoundry.lang", state.lang);
    applyLanguage();
  });
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("kfoundry.apiKey", $("api-key").value.trim());
    loadModel();
  });
  $("system").addEventListener("change", () => localStorage.setItem("kfoundry.system", $("system").value));
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { // isComposing: Korean IME is still composing
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  loadModel();
}

init();

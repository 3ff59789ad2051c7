// The playground's chat panel for text-generation adapters: a conversation, a composer (message,
// optional system prompt, temperature, max tokens, seed) and the reply streamed token by token
// from POST /v1/chat/completions (stream: true).
//
// The stream is read with fetch and a ReadableStream reader (EventSource cannot send the key's
// Authorization header); its server-sent events are parsed here: "data: {chunk}" events with
// choices[0].delta.content, a chunk with finish_reason, one with usage (stream_options), then
// "data: [DONE]"; an error after the status was sent comes as "data: {error: ...}". Stop aborts
// the fetch: the service cancels the sequence when its client leaves. Every text (turns, errors)
// is a text node: a reply holding markup shows as that markup, never as elements.
//
// Hooks for tests and screen readers: each reply's li carries data-state (streaming, done, stopped,
// failed), data-chunks (content chunks received) and data-finish-reason.

import { openStream } from "../api.js";
import { h, replace, errorBox, showError } from "../dom.js";

const ROLES = { user: "You", assistant: "Assistant" };

// Server-sent events from a fetch Response: yields each event's data (its data lines joined by "\n").
async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  const abort = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", abort);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }  // comments (":...") and other fields (event:, id:, retry:) carry nothing here
      }
      if (done) {
        if (data.length) yield data.join("\n");
        return;
      }
    }
  } finally {
    signal.removeEventListener("abort", abort);
  }
}

function streamError(e) {
  const m = e && typeof e === "object" ? e : {};
  return { message: String(m.message || "the reply failed"), param: m.param ? String(m.param) : null };
}

function optionalNumber(input, name, integer) {
  const raw = input.value.trim();
  if (!raw) return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw { message: `${name} must be ${integer ? "an integer" : "a number"}`, param: name };
  }
  return n;
}

export function chatPanel() {
  let history = [];  // [{role, content}] sent with each request (the system prompt is added then)
  let controller = null;
  const log = h("ol", { class: "chat-log", id: "chat-log", "aria-live": "polite" });
  const empty = h("p", { class: "muted chat-empty", text: "No messages yet." });
  const system = h("textarea", { id: "chat-system", rows: 2, placeholder: "optional, e.g. Answer briefly." });
  const temperature = h("input", { id: "chat-temperature", type: "number", step: "any", value: "0.7", inputmode: "decimal" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", step: "any", value: "256", inputmode: "numeric" });
  const seed = h("input", { id: "chat-seed", type: "number", step: "any", placeholder: "random", inputmode: "numeric" });
  const message = h("textarea", { id: "chat-message", rows: 3, placeholder: "Your message" });
  const send = h("button", { type: "submit", class: "primary", id: "chat-send", text: "Send" });
  const stopButton = h("button", { type: "button", class: "danger", id: "chat-stop", text: "Stop", disabled: true });
  const clearButton = h("button", { type: "button", id: "chat-clear", text: "New conversation" });
  const status = h("p", { class: "muted chat-status", id: "chat-status", role: "status" });
  const err = errorBox(null);
  err.id = "chat-error";

  function streaming(on) {
    send.disabled = on;
    clearButton.disabled = on;
    stopButton.disabled = !on;
  }

  function turn(role, text) {
    const body = h("div", { class: "turn-text" }, text);
    const li = h("li", { class: `turn turn-${role}` }, h("span", { class: "turn-role", text: ROLES[role] }), body);
    empty.hidden = true;
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(li);
    if (atEnd) log.scrollTop = log.scrollHeight;
    return { li, body };
  }

  message.addEventListener("keydown", (e) => {  // Enter sends, Shift+Enter breaks the line
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && message.form) {
      e.preventDefault();
      message.form.requestSubmit(send);
    }
  });
  stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
  clearButton.addEventListener("click", () => {
    history = [];
    replace(log);
    empty.hidden = false;
    replace(status);
    showError(err, null);
  });

  async function sendMessage(model) {
    showError(err, null);
    if (controller) return;
    const text = message.value;
    if (!text.trim()) { showError(err, { message: "write a message", param: "messages" }); return; }
    const body = { model, stream: true, stream_options: { include_usage: true } };
    try {
      const t = optionalNumber(temperature, "temperature", false);
      const m = optionalNumber(maxTokens, "max_tokens", true);
      const s = optionalNumber(seed, "seed", true);
      if (t !== undefined) body.temperature = t;
      if (m !== undefined) body.max_tokens = m;
      if (s !== undefined) body.seed = s;
    } catch (e) {
      showError(err, e);
      return;
    }
    const sys = system.value.trim();
    body.messages = [...(sys ? [{ role: "system", content: sys }] : []), ...history, { role: "user", content: text }];

    const user = turn("user", text);
    const reply = turn("assistant", "");
    const textNode = document.createTextNode("");
    reply.body.appendChild(textNode);
    reply.li.dataset.state = "streaming";
    reply.li.dataset.chunks = "0";
    message.value = "";
    replace(status, "Generating…");
    controller = new AbortController();
    const { signal } = controller;
    streaming(true);
    let finish = null;
    let usage = null;
    let chunks = 0;
    try {
      const response = await openStream("/v1/chat/completions", body, signal);
      for await (const data of sseData(response, signal)) {
        if (data === "[DONE]") break;
        let obj;
        try { obj = JSON.parse(data); } catch { continue; }
        if (obj && obj.error) throw streamError(obj.error);
        const choice = obj && Array.isArray(obj.choices) ? obj.choices[0] : null;
        const delta = choice && choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
        if (delta) {
          const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
          textNode.appendData(delta);
          chunks += 1;
          reply.li.dataset.chunks = String(chunks);
          if (follow) log.scrollTop = log.scrollHeight;
        }
        if (choice && choice.finish_reason) finish = String(choice.finish_reason);
        if (obj && obj.usage && typeof obj.usage === "object") usage = obj.usage;
      }
      if (signal.aborted) throw new DOMException("stopped", "AbortError");
      history.push({ role: "user", content: text }, { role: "assistant", content: textNode.data });
      reply.li.dataset.state = "done";
      if (finish) reply.li.dataset.finishReason = finish;
      replace(status, h("span", { class: "chat-finish" }, "finish: ", h("strong", { text: finish || "unknown" })),
        usage ? h("span", { class: "chat-usage", id: "chat-usage",
                            text: ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens` })
          : null);
    } catch (e) {
      if (e && e.name === "AbortError") {
        // stopped by the user: the partial reply stays in the conversation
        history.push({ role: "user", content: text }, { role: "assistant", content: textNode.data });
        reply.li.dataset.state = "stopped";
        replace(status, h("span", { class: "chat-finish" }, "finish: ", h("strong", { text: "stopped" })),
          ` · ${chunks} chunks received before Stop`);
      } else if (chunks === 0) {
        // refused before any reply: the message goes back into the box, the turns away
        user.li.remove();
        reply.li.remove();
        empty.hidden = log.childElementCount > 0;
        if (!message.value) message.value = text;
        replace(status);
        showError(err, e);
      } else {
        reply.li.dataset.state = "failed";
        history.push({ role: "user", content: text }, { role: "assistant", content: textNode.data });
        replace(status);
        showError(err, e);
      }
    } finally {
      controller = null;
      streaming(false);
    }
  }

  const node = h("div", { class: "chat" },
    h("div", { class: "chat-conversation" }, empty, log),
    h("label", { for: "chat-message", text: "Message" }), message,
    h("div", { class: "row chat-buttons" }, send, stopButton, clearButton),
    err, status,
    h("details", { class: "chat-settings", open: true }, h("summary", { text: "Settings" }),
      h("label", { for: "chat-system", text: "System prompt" }), system,
      h("div", { class: "row" },
        h("label", { for: "chat-temperature", text: "Temperature" }), temperature,
        h("label", { for: "chat-max-tokens", text: "Max tokens" }), maxTokens,
        h("label", { for: "chat-seed", text: "Seed" }), seed)));

  return {
    node,
    ownControls: true,  // its own Send button and results: the playground's Predict and Predictions hide
    send: sendMessage,
    stop() { if (controller) controller.abort(); },
  };
}

// The chat page's behaviour: send the conversation to POST /v1/chat/completions with
// stream: true, read the server-sent events off the response body as they arrive and append
// each delta to the reply. Only the browser's own fetch, streams and AbortController.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), messages: $("messages"), empty: $("empty"), error: $("error"),
  composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
  system: $("system"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  seed: $("seed"), apiKey: $("api-key"),
};

// The exchanges the model answered, oldest first ({user, assistant, elements}): what is sent
// back as the conversation so far. An exchange without a reply (an error, or stopped before
// the first word) is not kept, since an assistant turn needs content. When the conversation
// outgrows the model's context the oldest exchanges are dropped, as `scratchlm chat` does.
let history = [];
let conversation = 0; // bumped by "New chat", so a reply still arriving is not kept in the new one
let modelName = null;
let controller = null; // the AbortController of the reply being written, if any

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// An Error with the message (and code) of an OpenAI-style error body, {"error": {"message",
// "code", ...}}, or the status line when the body is something else.
async function apiError(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return Object.assign(new Error(body.error.message), { code: body.error.code });
    }
  } catch (_) { /* not JSON: fall through to the status line */ }
  return new Error(`${response.status} ${response.statusText}${text ? `: ${text.slice(0, 200)}` : ""}`);
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await apiError(response);
    const body = await response.json();
    const card = body.data && body.data[0];
    modelName = card ? card.id : null;
    ui.model.textContent = !card ? "no model"
      : card.context_length ? `${card.id} · context ${card.context_length} tokens` : card.id;
    showError("");
  } catch (err) {
    ui.model.textContent = "model unavailable";
    showError(`Could not list the models: ${err.message}`);
  }
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text; // text, never HTML: a reply cannot inject markup
  ui.messages.appendChild(element);
  scrollDown();
  return element;
}

function addNote(element, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  element.appendChild(note);
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function requestBody(userText) {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const exchange of history) {
    messages.push({ role: "user", content: exchange.user }, { role: "assistant", content: exchange.assistant });
  }
  messages.push({ role: "user", content: userText });
  const body = { model: modelName, messages, stream: true };
  // An empty field leaves the server's default (max tokens: the rest of the context).
  for (const [name, input, parse] of [["temperature", ui.temperature, parseFloat],
                                      ["top_p", ui.topP, parseFloat],
                                      ["max_tokens", ui.maxTokens, (v) => parseInt(v, 10)],
                                      ["seed", ui.seed, (v) => parseInt(v, 10)]]) {
    const value = parse(input.value);
    if (Number.isFinite(value)) body[name] = value;
  }
  return body;
}

// The reply's response: the request, retried without the oldest exchange for as long as the
// server says the conversation does not fit the context and there is an exchange to drop.
async function requestReply(userText, signal, replyElement) {
  let dropped = 0;
  for (;;) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(userText)), signal,
    });
    if (response.ok) {
      if (dropped) {
        addNote(replyElement, `the oldest ${dropped === 1 ? "exchange was" : `${dropped} exchanges were`} `
                              + "dropped to fit the model's context");
      }
      return response;
    }
    const error = await apiError(response);
    if (error.code !== "context_length_exceeded" || !history.length) throw error;
    const oldest = history.shift();
    oldest.elements.forEach((element) => {
      element.classList.add("dropped");
      element.title = "no longer in the model's context";
    });
    dropped += 1;
  }
}

// Server-sent events: events are separated by a blank line; each "data:" line carries a JSON
// chunk, and "[DONE]" ends the stream. Calls onChunk for each parsed chunk.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // a comment or keep-alive
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

async function send(userText) {
  showError("");
  const userElement = addMessage("user", userText);
  const replyElement = addMessage("assistant", "");
  const replyText = replyElement.appendChild(document.createTextNode(""));
  replyElement.classList.add("streaming");
  const thisConversation = conversation;
  let reply = "";
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await requestReply(userText, controller.signal, replyElement);
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        // The reply starts after the assistant's header: its leading whitespace is not text.
        reply += reply ? choice.delta.content : choice.delta.content.trimStart();
        replyText.data = reply;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (finish === "length") {
      addNote(replyElement, ui.maxTokens.value ? "cut at the max tokens setting" : "cut at the end of the model's context");
    }
  } catch (err) {
    if (err.name === "AbortError") addNote(replyElement, "stopped");
    else showError(err.message);
  } finally {
    controller = null;
    replyElement.classList.remove("streaming");
    setBusy(false);
  }
  if (conversation !== thisConversation) return;
  if (reply.trim()) {
    history.push({ user: userText, assistant: reply, elements: [userElement, replyElement] });
  } else {
    replyElement.remove();
    userElement.classList.add("dropped");
    userElement.title = "not kept in the conversation: no reply";
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || controller) return;
  ui.input.value = "";
  send(text);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => controller && controller.abort());

ui.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  conversation += 1;
  history = [];
  ui.messages.querySelectorAll(".message").forEach((element) => element.remove());
  ui.empty.hidden = false;
  showError("");
  ui.input.focus();
});

// A key entered after a 401 should not need a reload.
ui.apiKey.addEventListener("change", loadModel);

loadModel();
ui.input.focus();

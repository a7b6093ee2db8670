// The LLaDA-V playground: asks the server's chat completions API with `stream_canvas`, and draws every step's
// answer canvas (masked positions, committed tokens coloured by the step that committed them), then the stats.
"use strict";

const state = {
  key: sessionStorage.getItem("llada-v-key") || "",
  messages: [],        // the conversation so far (OpenAI messages), sent again with every question
  image: null,         // a data URL picked for the next question
  busy: false,
};

const $ = (id) => document.getElementById(id);

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  return headers;
}

function setStatus(kind, text) {
  $("status-dot").className = `dot ${kind}`;
  $("status").textContent = text;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-message").textContent = message;
  $("key").focus();
}

// The model's name, whether the server wants a key, and whether its engines are loaded.
async function probe() {
  let reply;
  try {
    reply = await fetch("/v1/models", { headers: requestHeaders() });
  } catch (err) {
    setStatus("offline", "cannot reach the server");
    return;
  }
  if (reply.status === 401) {
    setStatus("locked", "API key needed");
    askForKey(state.key ? "The server refused that key: check it." : "This server needs an API key.");
    return;
  }
  $("key-form").hidden = true;
  const models = await reply.json();
  $("model").textContent = models.data[0].id;
  const health = await fetch("/health");
  if (health.ok) {
    setStatus("ready", "ready");
  } else {
    setStatus("loading", "loading the engines…");
    setTimeout(probe, 2000);
  }
}

// ---- the image ---------------------------------------------------------------------------------------------

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

function clearPicked() {
  state.image = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("drop-hint").hidden = false;
  $("file").value = "";
}

// ---- one answer: its canvas, its text and its figures ---------------------------------------------------------

class AnswerView {
  constructor(container) {
    this.root = document.createElement("div");
    this.root.className = "turn assistant";
    this.canvas = document.createElement("div");
    this.canvas.className = "canvas";
    this.canvas.setAttribute("aria-label", "the answer canvas, step by step");
    this.text = document.createElement("p");
    this.text.className = "answer";
    this.stats = document.createElement("div");
    this.stats.className = "stats";
    this.stats.textContent = "waiting for a place in the batch…";
    this.root.append(this.canvas, this.text, this.stats);
    container.append(this.root);
    this.cells = [];
    this.lastStep = 0;
    this.root.dataset.canvases = "0";
    this.root.dataset.maskedCanvases = "0"; // canvases drawn while some positions were still masked
  }

  draw(canvas) {
    if (this.cells.length !== canvas.ids.length) {
      this.canvas.replaceChildren();
      this.cells = canvas.ids.map(() => {
        const cell = document.createElement("span");
        this.canvas.append(cell);
        return cell;
      });
    }
    this.lastStep = canvas.step;
    const end = canvas.ids.indexOf(canvas.eot_id);
    let masked = 0;
    canvas.ids.forEach((id, position) => {
      const cell = this.cells[position];
      const step = canvas.committed_at[position];
      const after = end >= 0 && position > end; // past the end of the answer: never decoded
      if (step === null) {
        if (!after) masked += 1;
        cell.className = "tok mask" + (after ? " after" : "");
        cell.textContent = "\u00a0";
        cell.title = `position ${position + 1}: ${after ? "after the end of the answer" : "masked"}`;
        return;
      }
      const isEnd = id === canvas.eot_id;
      cell.className = "tok" + (isEnd ? " end" : "") + (after ? " after" : "") + (step === canvas.step ? " fresh" : "");
      cell.textContent = isEnd ? "end" : visible(canvas.pieces[position]);
      // Blue for the first step to orange for the latest: where the model was sure first, and where it hesitated.
      const share = canvas.step > 1 ? (step - 1) / (canvas.step - 1) : 0;
      cell.style.setProperty("--hue", String(Math.round(220 - 205 * share)));
      cell.title = `position ${position + 1}: ${JSON.stringify(canvas.pieces[position])} (id ${id}), step ${step}`;
    });
    this.root.dataset.canvases = String(Number(this.root.dataset.canvases) + 1);
    if (masked > 0) this.root.dataset.maskedCanvases = String(Number(this.root.dataset.maskedCanvases) + 1);
    this.stats.textContent = `step ${canvas.step} · ${canvas.ids.length - masked} of ${canvas.ids.length} positions committed`;
  }

  setText(text) {
    this.text.textContent = text;
  }

  finish(stats) {
    this.cells.forEach((cell) => cell.classList.remove("fresh"));
    this.stats.replaceChildren(
      figure(stats.nfe, " denoiser calls"), ` (${stats.full_forwards} full, ${stats.cached_forwards} cached) · `,
      figure(stats.tokens_per_second.toFixed(1), " tokens/s"), " · ",
      figure(stats.seconds.toFixed(2), " s"), ` · ${this.lastStep} steps · ${stats.finish_reason === "length" ? "cut at the answer length" : "ended"}`,
    );
    this.root.dataset.done = "true";
  }

  fail(message) {
    const failure = document.createElement("p");
    failure.className = "failure";
    failure.textContent = message;
    this.root.append(failure);
    this.stats.textContent = "";
    this.root.dataset.done = "failed";
  }
}

function visible(piece) {
  return piece.replace(/\n/g, "\u21b5");
}

function figure(value, unit) {
  const span = document.createElement("span");
  const strong = document.createElement("b");
  strong.textContent = String(value);
  span.append(strong, unit);
  return span;
}

// ---- asking -----------------------------------------------------------------------------------------------

function settings() {
  const body = {
    max_tokens: Number($("max-tokens").value),
    block_length: Number($("block-length").value),
    cache: $("cache").value,
    refresh_interval: Number($("refresh-interval").value),
  };
  if ($("use-threshold").checked) body.threshold = Number($("threshold").value);
  return body;
}

function showQuestion(text, image) {
  const turn = document.createElement("div");
  turn.className = "turn user";
  if (image) {
    const thumb = document.createElement("img");
    thumb.src = image;
    thumb.alt = "the image asked about";
    turn.append(thumb);
  }
  const words = document.createElement("p");
  words.textContent = text;
  turn.append(words);
  $("conversation").append(turn);
}

async function errorMessage(reply) {
  try {
    const body = await reply.json();
    return body.error ? body.error.message : `the server answered ${reply.status}`;
  } catch (err) {
    return `the server answered ${reply.status} ${reply.statusText}`;
  }
}

// Reads the server-sent events; the answer's text, or null when the request failed.
async function readStream(reply, view) {
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return text;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return text;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        view.fail(chunk.error.message);
        return null;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (chunk.llada && chunk.llada.canvas) view.draw(chunk.llada.canvas);
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        view.setText(text);
      }
      if (choice && choice.finish_reason) view.finish(chunk.llada);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("empty").hidden = true;
  const image = state.image;
  const content = image ? [{ type: "text", text: question }, { type: "image_url", image_url: { url: image } }] : question;
  const turn = { role: "user", content };
  showQuestion(question, image);
  const view = new AnswerView($("conversation"));
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify({ messages: [...state.messages, turn], stream: true, stream_canvas: true, ...settings() }),
    });
    if (!reply.ok) {
      view.fail(await errorMessage(reply));
      if (reply.status === 401) askForKey("The server wants an API key for this.");
      return;
    }
    const text = await readStream(reply, view);
    if (text !== null) {
      state.messages.push(turn, { role: "assistant", content: text });
      $("question").value = "";
      if (image) clearPicked();
    }
  } catch (err) {
    view.fail(`the request failed: ${err.message}`);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    view.root.scrollIntoView({ block: "end" });
  }
}

function reset() {
  state.messages = [];
  clearPicked();
  $("conversation").replaceChildren($("empty"));
  $("empty").hidden = false;
}

// ---- wiring -----------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", () => useImage($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useImage(event.dataTransfer.files[0]);
  });
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) ask(event);
  });
  $("reset").addEventListener("click", reset);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem("llada-v-key", state.key);
    probe();
  });
  probe();
});

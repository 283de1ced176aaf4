// clipserve playground: plain JavaScript, no dependencies, everything from this server.
// The API key lives in sessionStorage only; server error messages are shown as the server wrote them.

const KEY_ITEM = "clipserve.apiKey";
const authRequired = document.body.dataset.auth !== "none";
const urlFetch = document.body.dataset.urlFetch === "enabled";
const pickers = new Map(); // panel id -> image picker of that panel

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith("aria-") || name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

// -- the API ---------------------------------------------------------------------------------------------

async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(`Cannot reach the server: ${err.message}`, 0);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON (a proxy's error page, say): the text itself is the message below.
  }
  if (!response.ok) {
    throw new ApiError(payload?.error?.message ?? (text || response.statusText), response.status);
  }
  return payload;
}

// The server's message as it wrote it, after the HTTP status when there was one.
const describe = (err) => (err.status ? `Error ${err.status}: ${err.message}` : err.message);

function showError(panel, err) {
  panel.querySelector("[data-error]").textContent = err === null ? "" : describe(err);
}

// Runs a form's request with its button disabled, then brings the answer into view where the form pushed it
// off the screen (phones, where the output comes after the form).
async function busy(form, work) {
  const button = form.querySelector('button[type="submit"]');
  button.disabled = true;
  try {
    await work();
  } finally {
    button.disabled = false;
  }
  const output = form.closest('[role="tabpanel"]').querySelector(".output");
  if (output.getBoundingClientRect().top > window.innerHeight * 0.8) output.scrollIntoView({ block: "start" });
}

// -- templates and image pickers -------------------------------------------------------------------------

function instantiate(templateId, prefix) {
  const fragment = document.getElementById(templateId).content.cloneNode(true);
  for (const node of fragment.querySelectorAll("*")) {
    for (const attr of ["id", "for", "name", "aria-describedby", "data-image-picker"]) {
      const value = node.getAttribute(attr);
      if (value?.startsWith("ID")) node.setAttribute(attr, prefix + value.slice(2));
    }
  }
  return fragment;
}

function imagePicker(container) {
  container.append(instantiate("image-picker", container.dataset.imagePicker));
  const [drop, preview, hint, file, urlField, urlInput, clear] = [
    "[data-drop]", "[data-preview]", "[data-hint]", "[data-file]", "[data-url-field]", "[data-url]", "[data-clear]",
  ].map((selector) => container.querySelector(selector));
  urlField.hidden = !urlFetch;
  let image = null; // {blob, name} or {url}

  function show(src, description) {
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = src;
    preview.alt = description;
    preview.hidden = false;
    clear.hidden = false;
  }
  function setBlob(blob, name) {
    image = { blob, name };
    urlInput.value = "";
    hint.textContent = `${name} (${Math.ceil(blob.size / 1024)} KB). Drop, paste or choose another to replace it.`;
    show(URL.createObjectURL(blob), `Chosen image: ${name}`);
  }
  function setUrl(url) {
    image = { url };
    file.value = "";
    hint.textContent = "The server fetches this URL.";
    show(url, `Image at ${url}`);
  }
  function reset() {
    image = null;
    file.value = "";
    urlInput.value = "";
    preview.hidden = true;
    preview.removeAttribute("src");
    clear.hidden = true;
    hint.textContent = "Drop an image here, paste one (Ctrl+V), or choose a file.";
  }

  file.addEventListener("change", () => file.files.length && setBlob(file.files[0], file.files[0].name));
  urlInput.addEventListener("change", () => (urlInput.value.trim() ? setUrl(urlInput.value.trim()) : reset()));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const dropped = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    const url = event.dataTransfer.getData("text/uri-list").split("\n")[0].trim();
    if (dropped) setBlob(dropped, dropped.name);
    else if (urlFetch && /^https?:\/\//.test(url)) setUrl(url);
    else hint.textContent = "That was not an image file: drop a PNG, JPEG, WebP or GIF.";
  });
  clear.addEventListener("click", () => {
    reset();
    file.focus();
  });
  return { get image() { return image; }, setBlob, reset };
}

function blobDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(`Cannot read the image: ${reader.error}`, 0));
    reader.readAsDataURL(blob);
  });
}

// -- classification ---------------------------------------------------------------------------------------

function setUpClassifyInputs(form) {
  const prefix = form.dataset.classifyInputs;
  form.prepend(instantiate("classify-inputs", prefix));
  const custom = form.querySelector("[data-custom-templates]");
  for (const radio of form.querySelectorAll(`input[name="${prefix}-prompts"]`)) {
    radio.addEventListener("change", () => (custom.hidden = form.querySelector(`input[name="${prefix}-prompts"]:checked`).value !== "custom"));
  }
}

function splitLines(text, separators) {
  return text.split(separators).map((s) => s.trim()).filter(Boolean);
}

// What a classify form asks for, or an ApiError saying what is missing.
function readClassifyInputs(form) {
  const prefix = form.dataset.classifyInputs;
  const image = pickers.get(form.closest('[role="tabpanel"]').id).image;
  if (!image) throw new ApiError("Choose, drop or paste an image first.", 0);
  const labels = splitLines(form.querySelector("[data-labels]").value, /[\n,]/);
  if (!labels.length) throw new ApiError("Type at least one candidate label.", 0);
  const promptSet = form.querySelector(`input[name="${prefix}-prompts"]:checked`).value;
  let templates = null;
  if (promptSet === "imagenet") templates = "imagenet";
  if (promptSet === "custom") templates = splitLines(form.querySelector("[data-templates]").value, /\n/);
  return { image, labels, templates };
}

function jsonBody(model, input, { labels, templates }) {
  return templates === null ? { model, input, labels } : { model, input, labels, templates };
}

async function classify(model, request) {
  const { image, labels, templates } = request;
  if (image.url) return api("/v1/classifications", { method: "POST", json: jsonBody(model, image.url, request) });
  const form = new FormData();
  form.append("model", model);
  form.append("files", image.blob, image.name);
  for (const label of labels) form.append("labels", label);
  for (const template of templates === "imagenet" ? ["imagenet"] : templates ?? []) form.append("templates", template);
  return api("/v1/classifications/upload", { method: "POST", form });
}

function ranking(result) {
  return el("ol", { className: "ranking" }, ...result.data[0].labels.map(({ label, probability, score }) => {
    const fill = el("span");
    fill.style.width = `${(probability * 100).toFixed(1)}%`;
    return el("li", {},
      el("span", { className: "label", textContent: label }),
      el("span", { className: "bar", "aria-hidden": "true" }, fill),
      el("span", { className: "numbers", textContent: `${(probability * 100).toFixed(1)}% · cos ${score.toFixed(3)}` }));
  }));
}

// -- snippets: the request the page sent, to copy ---------------------------------------------------------

const shellQuote = (s) => `'${s.replaceAll("'", "'\\''")}'`;
const python = (v) => (Array.isArray(v) ? `[${v.map(python).join(", ")}]` : JSON.stringify(v));

function snippetFileName(image) {
  if (/^[\w.-]+$/.test(image.name)) return image.name;
  return `image.${(image.blob.type.split("/")[1] || "png").replace(/\W/g, "")}`;
}

function curlSnippet(model, request) {
  const { image, labels, templates } = request;
  const url = location.origin + (image.url ? "/v1/classifications" : "/v1/classifications/upload");
  const lines = [`curl ${shellQuote(url)}`];
  if (authRequired) lines.push('-H "Authorization: Bearer $CLIPSERVE_API_KEY"');
  if (image.url) {
    lines.push('-H "Content-Type: application/json"', `-d ${shellQuote(JSON.stringify(jsonBody(model, image.url, request)))}`);
  } else {
    // --form-string: labels are sent as they are (curl's -F would read '@', '<' and ';type=' in them).
    lines.push(`--form-string ${shellQuote(`model=${model}`)}`, `-F ${shellQuote(`files=@${snippetFileName(image)}`)}`);
    for (const label of labels) lines.push(`--form-string ${shellQuote(`labels=${label}`)}`);
    for (const t of templates === "imagenet" ? ["imagenet"] : templates ?? []) lines.push(`--form-string ${shellQuote(`templates=${t}`)}`);
  }
  return lines.join(" \\\n  ");
}

function pythonSnippet(model, request) {
  const { image, labels, templates } = request;
  const apiKey = authRequired ? 'os.environ["CLIPSERVE_API_KEY"]' : '"unused"';
  const lines = [];
  if (!image.url) lines.push("import base64");
  if (authRequired) lines.push("import os");
  if (lines.length) lines.push("");
  lines.push("from openai import OpenAI", "", `client = OpenAI(base_url=${python(`${location.origin}/v1`)}, api_key=${apiKey})`);
  let input = python(image.url);
  if (!image.url) {
    lines.push(`with open(${python(snippetFileName(image))}, "rb") as f:`,
      `    image = ${python(`data:${image.blob.type || "image/png"};base64,`)} + base64.b64encode(f.read()).decode()`);
    input = "image";
  }
  lines.push('result = client.post("/classifications", cast_to=object, body={', `    "model": ${python(model)},`,
    `    "input": ${input},`, `    "labels": ${python(labels)},`);
  if (templates !== null) lines.push(`    "templates": ${python(templates)},`);
  lines.push("})", 'for item in result["data"][0]["labels"]:', '    print(item["label"], round(item["probability"], 4), round(item["score"], 4))');
  return lines.join("\n");
}

function setUpCopyButtons() {
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const status = button.closest(".snippets").querySelector("[data-copy-status]");
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        status.textContent = `${button.textContent.replace("Copy ", "")} copied.`;
      } catch {
        getSelection().selectAllChildren(document.getElementById(button.dataset.copy));
        status.textContent = "Copying is not allowed here: the text is selected, press Ctrl+C.";
      }
    });
  }
}

// -- the Classify and Compare tabs -------------------------------------------------------------------------

function setUpClassify() {
  const form = document.getElementById("classify-form");
  const panel = form.closest('[role="tabpanel"]');
  const results = document.getElementById("classify-results");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      showError(panel, null);
      try {
        const request = readClassifyInputs(form);
        const model = document.getElementById("classify-model").value;
        const result = await classify(model, request);
        results.replaceChildren(el("h2", { textContent: `Labels ranked by ${result.model}` }), ranking(result));
        document.getElementById("snippet-curl").textContent = curlSnippet(model, request);
        document.getElementById("snippet-python").textContent = pythonSnippet(model, request);
        document.getElementById("classify-snippets").hidden = false;
      } catch (err) {
        results.replaceChildren();
        showError(panel, err);
      }
    });
  });
}

function setUpCompare() {
  const form = document.getElementById("compare-form");
  const panel = form.closest('[role="tabpanel"]');
  const results = document.getElementById("compare-results");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      showError(panel, null);
      let request;
      try {
        request = readClassifyInputs(form);
      } catch (err) {
        showError(panel, err);
        return;
      }
      const models = [...form.querySelectorAll("[data-models]")].map((select) => select.value);
      const outcomes = await Promise.allSettled(models.map((model) => classify(model, request)));
      results.replaceChildren(...outcomes.map((outcome, i) => el("div", { className: "column" },
        el("h2", { textContent: models[i] || "(no model)" }),
        outcome.status === "fulfilled"
          ? ranking(outcome.value)
          : el("p", { className: "error", textContent: describe(outcome.reason) }))));
    });
  });
}

// -- the Search tab ------------------------------------------------------------------------------------------

function thumbnail(hit) {
  const thumb = hit.metadata?.thumbnail;
  const src = typeof thumb === "string" && thumb.startsWith("data:image/") ? thumb
    : /^https?:\/\//.test(hit.source ?? "") ? hit.source : null;
  return src ? el("img", { src, alt: "" }) : el("span", { className: "text-item", textContent: hit.text ?? hit.source ?? "" });
}

function metadataList(metadata) {
  const entries = Object.entries(metadata ?? {}).filter(([key]) => key !== "thumbnail");
  return el("dl", {}, ...entries.flatMap(([key, value]) => [
    el("dt", { textContent: key }),
    el("dd", { textContent: typeof value === "string" ? value : JSON.stringify(value) }),
  ]));
}

function setUpSearch() {
  const form = document.getElementById("search-form");
  const panel = form.closest('[role="tabpanel"]');
  const collection = document.getElementById("search-collection");
  const heading = document.getElementById("search-heading");
  const grid = document.getElementById("search-results");
  const text = document.getElementById("search-text");

  async function search(name, query, title, { focus = false } = {}) {
    showError(panel, null);
    try {
      const topK = Number(document.getElementById("search-top-k").value);
      const hits = (await api(`/v1/collections/${encodeURIComponent(name)}/search`, { method: "POST", json: { ...query, top_k: topK } })).data;
      heading.textContent = `${title}: ${hits.length} result${hits.length === 1 ? "" : "s"} in ${name}`;
      heading.hidden = false;
      grid.replaceChildren(...hits.map((hit) => card(name, hit)));
      if (focus) {
        heading.tabIndex = -1;
        heading.focus();
      }
    } catch (err) {
      showError(panel, err);
    }
  }

  function card(name, hit) {
    const title = `#${hit.id}${hit.text || hit.source ? ` ${hit.text ?? hit.source}` : ""}`;
    const button = el("button", { type: "button", className: "thumb", "aria-label": `Find items similar to ${title}` }, thumbnail(hit));
    button.addEventListener("click", async () => {
      try {
        const item = await api(`/v1/collections/${encodeURIComponent(name)}/items/${hit.id}?embedding=true`);
        await search(name, { vector: item.embedding }, `Similar to ${title}`, { focus: true });
      } catch (err) {
        showError(panel, err);
      }
    });
    return el("li", { "data-item-id": String(hit.id) }, button,
      el("p", { className: "score", textContent: `score ${hit.score.toFixed(3)}` }),
      el("p", { className: "title", textContent: title }), metadataList(hit.metadata));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      const image = pickers.get(panel.id).image;
      if (!collection.value) return showError(panel, new ApiError("There is no collection to search.", 0));
      if (image?.blob) return search(collection.value, { image: await blobDataUrl(image.blob) }, `Nearest to ${image.name}`);
      if (image?.url) return search(collection.value, { image: image.url }, "Nearest to the image");
      if (!text.value.trim()) return showError(panel, new ApiError("Type a query or give an image.", 0));
      return search(collection.value, { text: text.value.trim() }, `Nearest to “${text.value.trim()}”`);
    });
  });
}

async function loadCollections() {
  const panel = document.getElementById("panel-search");
  const select = document.getElementById("search-collection");
  const notice = document.getElementById("search-notice");
  select.replaceChildren();
  notice.textContent = "";
  showError(panel, null);
  let collections;
  try {
    collections = (await api("/v1/collections")).data;
  } catch (err) {
    if (err.status === 404) notice.textContent = "This server has no collections API, so there is nothing to search here.";
    else showError(panel, err);
    return;
  }
  if (!collections.length) {
    notice.replaceChildren("This server has no collections yet. Create one with ",
      el("code", { textContent: "clipserve collection create NAME --model MODEL" }), " and fill it with ",
      el("code", { textContent: "clipserve collection add NAME PATHS" }), ".");
  }
  select.disabled = !collections.length;
  select.append(...collections.map((c) => el("option", { value: c.id, textContent: `${c.id} (${c.items} items, ${c.model})` })));
}

// -- models, the key, tabs ------------------------------------------------------------------------------------

function keyStatus(message, isError = false) {
  const status = document.getElementById("key-status");
  status.textContent = message;
  status.classList.toggle("error-text", isError);
}

async function loadModels() {
  let models = [];
  try {
    models = (await api("/v1/models")).data;
    keyStatus(`Connected: ${models.length} model${models.length === 1 ? "" : "s"} (${models.map((m) => m.id).join(", ")}).`);
  } catch (err) {
    keyStatus(describe(err), true);
  }
  for (const select of document.querySelectorAll("[data-models]")) {
    const previous = select.value;
    select.replaceChildren(...models.map((m) => el("option", {
      value: m.id, textContent: `${m.id} (${m.embed_dim}-d, ${m.image_size} px)`,
    })));
    const fallback = "second" in select.dataset && models.length > 1 ? models[1].id : models[0]?.id;
    select.value = models.some((m) => m.id === previous) ? previous : fallback ?? "";
  }
  document.getElementById("compare-note").textContent = models.length === 1
    ? "Only one model is loaded: start the server with a second --model to compare two." : "";
  return models;
}

async function connect() {
  if ((await loadModels()).length) await loadCollections();
}

function setUpKey() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const placeholder = () => (input.placeholder = sessionStorage.getItem(KEY_ITEM) ? "a key is set for this tab" : "");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return keyStatus("Type an API key first.", true);
    sessionStorage.setItem(KEY_ITEM, key);
    input.value = "";
    placeholder();
    connect();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    placeholder();
    keyStatus("Key forgotten.");
  });
  placeholder();
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  function choose(tab, focus) {
    for (const t of tabs) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => choose(tab, false));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      choose(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
    });
  });
}

function setUpPaste() {
  document.addEventListener("paste", (event) => {
    const image = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
    const panel = document.querySelector('[role="tabpanel"]:not([hidden])');
    if (!image || !pickers.has(panel.id)) return;
    event.preventDefault();
    pickers.get(panel.id).setBlob(image, image.name || "pasted.png");
  });
}

for (const form of document.querySelectorAll("[data-classify-inputs]")) setUpClassifyInputs(form);
for (const container of document.querySelectorAll("[data-image-picker]")) {
  pickers.set(container.closest('[role="tabpanel"]').id, imagePicker(container));
}
setUpTabs();
setUpKey();
setUpPaste();
setUpCopyButtons();
setUpClassify();
setUpCompare();
setUpSearch();
if (!authRequired || sessionStorage.getItem(KEY_ITEM)) connect();
else keyStatus("Enter an API key to start.");

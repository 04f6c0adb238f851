// The web console: a form built from GET /v1/service's input schema; jobs go through the
// same /v1 API as any client's. Vanilla JS, no build step. URLs are relative, so the page
// also works behind a proxy's path prefix. The key is sent as `Authorization: Bearer`,
// which <img src> and EventSource cannot do: outputs are fetched into object URLs and the
// job's events are read with fetch().
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "model-service-api-key";
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  let service = null; // GET /v1/service
  let fields = []; // [{name, read: async () => value | undefined, write: (value) => bool}]
  let current = null; // the job shown: {id, job, abort, timer, outputs}
  let historySeq = 0;
  let travelImages = null; // the travel mode's images: {read, write}
  let joinClips = null; // the join mode's clips
  let redoVideo = null; // the redo mode's video
  const objectUrls = [];

  class ApiError extends Error {
    constructor(status, error) {
      super(error.message);
      this.status = status;
      this.error = error;
    }
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null && value !== false) {
        node.setAttribute(name, value === true ? "" : value);
      }
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  function button(text, onclick, testid) {
    const node = el("button", { type: "button", class: "small", "data-testid": testid }, text);
    node.onclick = (event) => {
      event.stopPropagation();
      onclick();
    };
    return node;
  }

  // --- HTTP ---------------------------------------------------------------------------

  function authHeaders(extra = {}) {
    const key = sessionStorage.getItem(KEY);
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  async function request(path, { method = "GET", body, form, signal, headers } = {}) {
    const init = { method, signal, headers: authHeaders(headers) };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    } else if (form) {
      init.body = form;
    }
    const response = await fetch(path, init);
    if (response.status === 401) askKey(true);
    if (!response.ok) {
      let error = { code: `http_${response.status}`, message: response.statusText };
      try {
        error = (await response.json()).error || error;
      } catch {
        // not JSON: keep the status line
      }
      throw new ApiError(response.status, error);
    }
    return response;
  }

  const api = async (path, options) => (await request(path, options)).json();
  const jobPath = (id, rest = "") => `v1/jobs/${encodeURIComponent(id)}${rest}`;

  async function blobUrl(path) {
    const url = URL.createObjectURL(await (await request(path)).blob());
    objectUrls.push(url);
    return url;
  }

  async function upload(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    return (await api("v1/uploads", { method: "POST", form })).id;
  }

  // --- API key and errors -------------------------------------------------------------

  function askKey(refused) {
    $("key-box").hidden = false;
    if (refused && sessionStorage.getItem(KEY)) {
      $("key-note").textContent = "The service refused this key; enter another one.";
    }
    $("api-key").focus();
  }

  $("key-form").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value.trim());
    $("key-box").hidden = true;
    start();
  };

  function showError(box, err) {
    const error = err.error || { code: "network_error", message: String(err.message || err) };
    box.replaceChildren(
      el("strong", { "data-testid": "error-code" }, error.code),
      ": ",
      el("span", { "data-testid": "error-message" }, error.message),
      error.field ? el("div", { class: "muted", "data-testid": "error-field" }, `field: ${error.field}`) : null,
    );
    box.hidden = false;
    const name = String(error.field || "").replace(/^input\./, "").split(/[.[]/)[0];
    document.querySelector(`.field[data-field="${CSS.escape(name)}"]`)?.classList.add("bad");
  }

  // a check made here, before anything is sent (its code is none of the API's)
  const localError = (name, message, code = "invalid_json") =>
    Object.assign(new Error(message), { error: { code, message, field: `input.${name}` } });

  // --- the form, from the input's JSON schema -----------------------------------------

  function resolve(schema) {
    // `X | None` (anyOf [X, null]) -> X, and $ref -> its definition; the outer keys win
    // (description, default, title)
    let nullable = false;
    let merged = schema;
    if (schema.anyOf) {
      const rest = schema.anyOf.filter((branch) => branch.type !== "null");
      nullable = rest.length < schema.anyOf.length;
      if (rest.length === 1) {
        const { anyOf, ...outer } = schema;
        merged = { ...rest[0], ...outer };
      }
    }
    if (merged.$ref) {
      const { $ref, ...outer } = merged;
      merged = { ...(service.input_schema.$defs || {})[$ref.split("/").pop()], ...outer };
    }
    return [merged, nullable];
  }

  function typeLabel(schema) {
    if (schema.enum) return schema.enum.join(" | ");
    return schema.type || "value";
  }

  function itemHint(schema) {
    // an array of objects (e.g. LoRAs): the item's fields as a hint below the JSON box
    if (schema.type !== "array" || !schema.items) return null;
    const [item] = resolve(schema.items);
    if (!item.properties) return null;
    const required = new Set(item.required || []);
    const lines = Object.entries(item.properties).map(([name, prop]) => {
      const [p] = resolve(prop);
      const extra = required.has(name) ? "required" : `default ${JSON.stringify(p.default)}`;
      return el("li", {}, el("code", {}, name), ` (${typeLabel(p)}, ${extra})`, p.description ? `: ${p.description}` : "");
    });
    return el("div", { class: "hint" }, `A JSON list of ${item.title || "objects"}:`, el("ul", {}, ...lines));
  }

  function jsonPlaceholder(schema) {
    const [item] = schema.items ? resolve(schema.items) : [{}];
    const example = Object.fromEntries((item.required || []).map((name) => [name, "…"]));
    return schema.type === "array" ? JSON.stringify([example]) : "{}";
  }

  function mediaWidget(kind, many, attrs) {
    const file = el("input", { ...attrs, type: "file", accept: `${kind}/*`, multiple: many });
    const ref = el("input", {
      type: "text",
      class: "ref",
      id: `${attrs.id}-ref`,
      "aria-label": `${attrs.name}: URL or upload id`,
      placeholder: many ? "or https URLs / upload ids, separated by spaces" : "or an https URL / upload id",
    });
    const preview = el("div", { class: "preview", "data-testid": `preview-${attrs.name}` });
    file.onchange = () => {
      for (const node of preview.children) URL.revokeObjectURL(node.src);
      const tag = kind === "image" ? "img" : kind;
      preview.replaceChildren(
        ...[...file.files].map((f) => el(tag, { src: URL.createObjectURL(f), title: f.name, alt: f.name, controls: tag !== "img" })),
      );
    };
    async function read() {
      if (file.files.length) {
        const ids = [];
        for (const f of file.files) ids.push(await upload(f));
        return many ? ids : ids[0];
      }
      const text = ref.value.trim();
      if (!text) return undefined;
      return many ? text.split(/\s+/) : text;
    }
    function write(value) {
      // a job's URLs and upload ids are reusable; a data URI is shown shortened, and a
      // long video's part names its image "(image N)": not
      file.value = "";
      preview.replaceChildren();
      const refs = value == null ? [] : [value].flat();
      const usable = refs.filter((r) => !/^(data:|\()/.test(String(r)));
      ref.value = usable.join(" ");
      return usable.length === refs.length;
    }
    return { control: el("div", { class: "media" }, file, ref, preview), read, write };
  }

  function widget(name, schema, id) {
    const attrs = { id, name, "data-testid": `field-${name}` };
    const kind = service.media[name];
    if (kind) return mediaWidget(kind, schema.type === "array", attrs);
    if (schema.enum) {
      const options = schema.enum.map((value) =>
        el("option", { value: JSON.stringify(value), selected: value === schema.default }, String(value)),
      );
      const select = el("select", attrs, schema.default == null ? el("option", { value: "" }, "—") : null, ...options);
      const write = (value) => {
        select.value = value === undefined ? (schema.default == null ? "" : JSON.stringify(schema.default)) : JSON.stringify(value);
        return true;
      };
      return { control: select, read: async () => (select.value === "" ? undefined : JSON.parse(select.value)), write };
    }
    if (schema.type === "boolean") {
      const box = el("input", { ...attrs, type: "checkbox", checked: schema.default === true });
      const write = (value) => {
        box.checked = (value === undefined ? schema.default : value) === true;
        return true;
      };
      return { control: box, read: async () => box.checked, write };
    }
    if (schema.type === "integer" || schema.type === "number") {
      const input = el("input", {
        ...attrs,
        type: "number",
        min: schema.minimum ?? schema.exclusiveMinimum,
        max: schema.maximum ?? schema.exclusiveMaximum,
        step: schema.multipleOf ?? (schema.type === "integer" ? 1 : "any"),
        value: schema.default ?? undefined,
        placeholder: schema.default == null ? "default" : undefined,
      });
      async function read() {
        if (input.validity.badInput) throw localError(name, "not a number", "not_a_number");
        return input.value === "" ? undefined : Number(input.value);
      }
      const write = (value) => {
        input.value = String((value === undefined ? schema.default : value) ?? "");
        return true;
      };
      return { control: input, read, write };
    }
    if (schema.type === "string") {
      const long = (schema.maxLength || 0) > 200 || name.includes("prompt");
      const input = long
        ? el("textarea", { ...attrs, rows: 3, maxlength: schema.maxLength })
        : el("input", { ...attrs, type: "text", maxlength: schema.maxLength });
      const write = (value) => {
        input.value = (value === undefined ? schema.default : value) ?? "";
        return true;
      };
      write(undefined);
      return { control: input, read: async () => (input.value === "" ? undefined : input.value), write };
    }
    // arrays of objects (e.g. LoRAs) and anything else: JSON
    const area = el("textarea", { ...attrs, rows: 3, class: "json", spellcheck: "false", placeholder: jsonPlaceholder(schema) });
    const write = (value) => {
      const shown = value === undefined ? schema.default : value;
      area.value = shown == null || JSON.stringify(shown) === "[]" ? "" : JSON.stringify(shown);
      return true;
    };
    write(undefined);
    async function read() {
      if (!area.value.trim()) return undefined;
      try {
        return JSON.parse(area.value);
      } catch (err) {
        throw localError(name, `not valid JSON: ${err.message}`);
      }
    }
    return { control: el("div", {}, area, itemHint(schema)), read, write };
  }

  function buildForm() {
    const schema = service.input_schema;
    const required = new Set(schema.required || []);
    fields = [];
    $("fields").replaceChildren(
      ...Object.entries(schema.properties || {}).map(([name, prop]) => {
        const [resolved] = resolve(prop);
        const id = `f-${name}`;
        const { control, read, write } = widget(name, resolved, id);
        fields.push({ name, read, write });
        const wide = !["INPUT", "SELECT"].includes(control.tagName) || control.type === "text";
        return el(
          "div",
          { class: wide ? "field wide" : "field", "data-field": name },
          el("label", { for: id }, resolved.title || name, required.has(name) ? el("span", { class: "req" }, " *") : null),
          control,
          resolved.description ? el("small", { class: "hint" }, resolved.description) : null,
        );
      }),
    );
    const lv = service.long_video;
    $("mode").hidden = !lv;
    if (lv) {
      $("segment-prompt-box").hidden = !lv.segment_fields.includes("prompt");
      $("mode-travel-label").hidden = !lv.travels;
      $("mode-join-label").hidden = $("mode-redo-label").hidden = !lv.joins;
      const images = mediaWidget("image", true, { id: "travel-images", name: "images", "data-testid": "travel-images" });
      $("travel-images-box").replaceChildren(images.control);
      travelImages = images;
      joinClips = mediaWidget("video", true, { id: "join-clips", name: "clips", "data-testid": "join-clips" });
      $("join-clips-box").replaceChildren(joinClips.control);
      redoVideo = mediaWidget("video", false, { id: "redo-video", name: "video", "data-testid": "redo-video" });
      $("redo-video-box").replaceChildren(redoVideo.control);
      modeChanged();
    }
  }

  const mode = () => (service.long_video ? document.querySelector("input[name=mode]:checked").value : "job");

  function modeChanged() {
    const lv = service.long_video;
    const hints = {
      job: "",
      chain: `Segments, each starting from the last frame of the one before (needs ${lv.image_field}); add segments while it waits, then finalize.`,
      travel: lv.end_image_field
        ? "A leg from each image to the next (first and last frame), joined into one video."
        : "A leg starting at each image, joined into one video.",
      join: "Your clips with new frames between each two, from one clip's last frame to the next one's first.",
      redo: "The stretch made again from the frame before it to the frame after it; the rest, the frame rate and the sound kept.",
    };
    $("mode-hint").textContent = hints[mode()];
    for (const name of ["travel", "join", "redo"]) $(`${name}-box`).hidden = mode() !== name;
  }
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.onchange = modeChanged;

  // the settings of `job` back in the form (its mode too): run it again, or change a field
  function reuse(job) {
    const long = job.kind !== "job";
    const input = { ...((long ? job.input.input : job.input) || {}) };
    // a redo's own prompt is the form's prompt field (a join's goes in its box below)
    if (job.kind === "redo" && job.input.prompt) input.prompt = job.input.prompt;
    const lost = fields.filter((field) => !field.write(input[field.name])).map((field) => field.name);
    if (service.long_video) {
      $(`mode-${long ? job.kind : "job"}`).checked = true;
      modeChanged();
      if (job.kind === "travel") {
        if (!travelImages.write(job.input.images)) lost.push("images");
        $("travel-prompts").value = (job.input.prompts || []).join("\n");
      } else if (job.kind === "join") {
        if (!joinClips.write(job.input.clips)) lost.push("clips");
        $("join-bridge-frames").value = job.input.bridge_frames ?? 15;
        $("join-prompts").value = (job.input.prompts || [job.input.prompt].filter(Boolean)).join("\n");
      } else if (job.kind === "redo") {
        if (!redoVideo.write(job.input.video)) lost.push("video");
        $("redo-start").value = job.input.start_frame;
        $("redo-end").value = job.input.end_frame;
      }
    }
    const again = lost.length ? `; choose again (sent as data): ${lost.join(", ")}` : "";
    $("submit-state").textContent = `the settings of ${job.id}${again}`;
    $("new-job").scrollIntoView({ block: "nearest" });
  }

  $("job-form").onsubmit = async (event) => {
    event.preventDefault();
    $("submit-error").hidden = true;
    for (const row of document.querySelectorAll(".field.bad")) row.classList.remove("bad");
    $("submit").disabled = true;
    $("submit-state").textContent = "sending…";
    try {
      const input = {};
      for (const field of fields) {
        const value = await field.read(); // files are uploaded here: their id is the value
        if (value !== undefined) input[field.name] = value;
      }
      let job;
      if (mode() === "chain") {
        job = await api("v1/chains", { method: "POST", body: { input, segments: [{}], interactive: true } });
      } else if (mode() === "travel") {
        const body = { input, images: (await travelImages.read()) || [] };
        const prompts = $("travel-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
        if (prompts.length) body.prompts = prompts;
        job = await api("v1/travels", { method: "POST", body });
      } else if (mode() === "join") {
        const body = { input, clips: (await joinClips.read()) || [] };
        if ($("join-bridge-frames").value) body.bridge_frames = Number($("join-bridge-frames").value);
        const prompts = $("join-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
        if (prompts.length === 1) body.prompt = prompts[0];
        else if (prompts.length > 1) body.prompts = prompts;
        job = await api("v1/joins", { method: "POST", body });
      } else if (mode() === "redo") {
        const body = {
          input,
          video: await redoVideo.read(),
          start_frame: Number($("redo-start").value),
          end_frame: Number($("redo-end").value),
        };
        job = await api("v1/redos", { method: "POST", body });
      } else {
        job = await api("v1/jobs", { method: "POST", body: { input } });
      }
      show(job);
      refreshHistory();
    } catch (err) {
      showError($("submit-error"), err);
    } finally {
      $("submit").disabled = false;
      $("submit-state").textContent = "";
    }
  };

  // --- the job shown: live over its event stream, else polled --------------------------

  function show(job) {
    if (current) {
      current.abort.abort();
      clearTimeout(current.timer);
    }
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    for (const row of document.querySelectorAll("tr.selected")) row.classList.remove("selected");
    $("result").replaceChildren();
    $("part-view").replaceChildren();
    $("job-error").hidden = true;
    current = { id: job.id, job: null, abort: new AbortController(), timer: 0, outputs: null };
    renderInput(job);
    render(job);
    if (!TERMINAL.has(job.status)) watch(current);
  }

  function render(job) {
    if (!current || current.id !== job.id) return;
    const before = current.job?.status;
    // an answer that left before the job finished (e.g. cancel's) arriving after the
    // stream's last event; a retry shows the job afresh
    if (TERMINAL.has(before) && !TERMINAL.has(job.status)) return;
    current.job = job;
    const panel = $("job");
    panel.hidden = false;
    panel.dataset.status = job.status;
    $("job-id").textContent = job.id;
    $("job-kind").textContent = job.kind === "job" ? "" : job.kind;
    $("job-status").textContent = job.status.replace("_", " ");
    $("job-status").className = `status ${job.status}`;
    $("job-progress").value = job.progress.fraction;
    $("job-progress-text").textContent = `${progressText(job)}${Math.round(job.progress.fraction * 100)}%`;
    const t = job.timings;
    $("job-meta").textContent = [
      job.seed != null ? `seed ${job.seed}` : null,
      t.queue_wait_s != null ? `waited ${t.queue_wait_s.toFixed(1)} s` : null,
      t.run_s != null ? `ran ${t.run_s.toFixed(1)} s` : null,
      job.attempts > 1 ? `attempt ${job.attempts}` : null,
    ].filter(Boolean).join(" · ");
    if (before !== job.status) $("job-actions").replaceChildren(...actions(job)); // not per event
    if (job.error) showError($("job-error"), job);
    else if (before !== job.status) $("job-error").hidden = true;
    $("chain-controls").hidden = !(job.kind === "chain" && job.status === "awaiting_input");
    $("delete-segment").hidden = !job.parts?.length;
    renderParts(job);
    renderOutputs(job);
    const row = document.querySelector(`tr[data-job-id="${CSS.escape(job.id)}"]`);
    if (row) fillRow(row, job);
    if (before !== undefined && before !== job.status) refreshHistory();
  }

  // a long video counts its parts, not the steps of all of them together
  function progressText(job) {
    const parts = job.parts || [];
    if (!parts.length) return job.progress.total ? `step ${job.progress.step} / ${job.progress.total} · ` : "";
    const word = { travel: "leg", join: "bridge", redo: "stretch" }[job.kind] || "segment";
    const done = parts.filter((part) => part.status === "succeeded").length;
    if (done === parts.length) return `${done} ${word}${done === 1 ? "" : "s"} done · `;
    const running = parts.find((part) => part.status !== "succeeded");
    return `${word} ${done + 1} / ${parts.length} (${Math.round(running.progress * 100)}%) · `;
  }

  const shown = (value) => {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text.length > 400 ? `${text.slice(0, 400)}…` : text;
  };

  // what the job was asked: the service's fields (a long video's shared input first)
  function renderInput(job) {
    const long = job.kind !== "job" && job.input.input;
    const entries = long
      ? [...Object.entries(job.input.input), ...Object.entries(job.input).filter(([name]) => name !== "input")]
      : Object.entries(job.input);
    $("job-input").replaceChildren(
      ...entries.flatMap(([name, value]) => [el("dt", {}, name), el("dd", { "data-field": name }, shown(value))]),
    );
  }

  function renderParts(job) {
    const list = $("job-parts");
    list.hidden = !job.parts;
    list.replaceChildren(
      ...(job.parts || []).map((part) =>
        el(
          "li",
          { "data-status": part.status },
          `segment ${part.index + 1}: ${part.status.replace("_", " ")} ${Math.round(part.progress * 100)}% `,
          part.video ? button("view", () => showPart(part), "view-part") : null,
        ),
      ),
    );
  }

  async function showPart(part) {
    const name = part.video.split("/").pop();
    try {
      const video = el("video", { controls: true, src: await blobUrl(jobPath(part.id, `/outputs/${name}`)) });
      $("part-view").replaceChildren(el("figure", { class: "output" }, video, el("figcaption", {}, `segment ${part.index + 1}`)));
    } catch (err) {
      showError($("job-error"), err);
    }
  }

  function renderOutputs(job) {
    const names = job.outputs.map((out) => out.name).join("\n");
    if (names === current.outputs) return; // each output is fetched once
    current.outputs = names;
    $("result").replaceChildren(...job.outputs.map((out) => outputElement(job, out)));
  }

  function outputElement(job, out) {
    const type = out.content_type || "";
    const tag = ["image", "video", "audio"].find((kind) => type.startsWith(`${kind}/`));
    const media = tag ? el(tag === "image" ? "img" : tag, { alt: out.name, controls: tag !== "image" }) : null;
    const link = el("a", { download: out.name }, out.name);
    const figure = el("figure", { class: "output", "data-testid": "output" }, media, el("figcaption", {}, link));
    const show = (url) => {
      if (media) media.src = url;
      link.href = url;
    };
    if (job.outputs_expired) {
      show(out.url); // only those in object storage are left: their own URL
    } else {
      blobUrl(jobPath(job.id, `/outputs/${encodeURIComponent(out.name)}`))
        .then(show)
        .catch((err) => figure.append(el("div", { class: "error" }, `${out.name}: ${err.message}`)));
    }
    return figure;
  }

  function parseEvent(block) {
    let kind = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "event") kind = value;
      else if (name === "data") data.push(value);
    }
    return { kind, data: data.join("\n") };
  }

  async function watch(w) {
    const { signal } = w.abort;
    try {
      const response = await request(jobPath(w.id, "/events"), { signal, headers: { Accept: "text/event-stream" } });
      $("job").dataset.watch = "events";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.data) render(JSON.parse(event.data));
        }
      }
    } catch (err) {
      if (signal.aborted || err.status === 401 || err.status === 404) return;
    }
    if (!signal.aborted && !TERMINAL.has(w.job?.status)) poll(w); // the stream failed
  }

  function poll(w) {
    $("job").dataset.watch = "polling";
    const tick = async () => {
      if (w !== current) return;
      try {
        render(await api(jobPath(w.id)));
        if (TERMINAL.has(w.job.status)) return;
      } catch (err) {
        if (err.status === 401 || err.status === 404) return;
      }
      w.timer = setTimeout(tick, 1000);
    };
    w.timer = setTimeout(tick, 1000);
  }

  // --- actions and history ------------------------------------------------------------

  function actions(job) {
    const out = [button("Use settings", () => reuse(job), "reuse")];
    if (!TERMINAL.has(job.status)) out.push(button("Cancel", () => act(job.id, "cancel"), "cancel"));
    if (job.status === "failed" || job.status === "canceled") {
      out.push(button("Retry", () => act(job.id, "retry"), "retry"));
    }
    return out;
  }

  async function act(id, verb, path = jobPath(id, `/${verb}`), body = undefined, method = "POST") {
    try {
      const job = await api(path, { method, body });
      if (verb === "retry") show(job);
      else render(job);
      return true;
    } catch (err) {
      showError(current?.id === id ? $("job-error") : $("history-error"), err);
      return false;
    } finally {
      refreshHistory();
    }
  }

  $("add-segment").onclick = async () => {
    const prompt = $("segment-prompt").value.trim();
    const body = { segments: [prompt ? { prompt } : {}] };
    const path = `v1/chains/${encodeURIComponent(current.id)}/segments`;
    if (await act(current.id, "segments", path, body)) $("segment-prompt").value = "";
  };
  $("delete-segment").onclick = () =>
    act(current.id, "delete-segment", `v1/chains/${encodeURIComponent(current.id)}/segments/last`, undefined, "DELETE");
  $("finalize").onclick = () => act(current.id, "finalize", `v1/chains/${encodeURIComponent(current.id)}/finalize`);

  function fillRow(row, job) {
    row.classList.toggle("selected", current?.id === job.id);
    if (!row.cells.length) {
      const name = el("div", { class: "label", "data-testid": "job-label", title: label(job) }, label(job));
      row.append(el("td", {}, name, el("code", {}, job.id)), el("td", {}, job.parent_id ? "part" : job.kind));
      row.append(el("td"), el("td"), el("td"), el("td", { class: "actions" }));
    }
    const [, , status, progress, queued, buttons] = row.cells;
    progress.textContent = `${Math.round(job.progress.fraction * 100)}%`;
    if (row.dataset.status === job.status) return; // buttons stay the same elements
    row.dataset.status = job.status;
    status.replaceChildren(el("span", { class: `status ${job.status}` }, job.status.replace("_", " ")));
    queued.textContent = new Date(job.timings.queued_at).toLocaleTimeString();
    buttons.replaceChildren(...actions(job));
  }

  // a row's name: the job's prompt (or its first text that is not a file)
  function label(job) {
    const input = (job.kind === "job" ? job.input : job.input.input) || {};
    const own = job.kind === "job" ? null : job.input.prompt || (job.input.prompts || [])[0];
    const texts = [own, input.prompt, input.text, ...Object.values(input)].filter(
      (value) => typeof value === "string" && value && !/^(data:|https?:|upl_)/.test(value),
    );
    return texts.length ? shown(texts[0]).slice(0, 80) : "";
  }

  async function refreshHistory() {
    const seq = ++historySeq; // only the latest answer is shown
    let list;
    try {
      list = await api("v1/jobs?limit=20");
    } catch (err) {
      if (err.status !== 401 && seq === historySeq) showError($("history-error"), err);
      return;
    }
    if (seq !== historySeq) return;
    $("history-error").hidden = true;
    const none = el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No jobs yet."));
    $("history-body").replaceChildren(
      ...(list.jobs.length ? [] : [none]),
      ...list.jobs.map((job) => {
        const row = el("tr", { "data-job-id": job.id, "data-testid": "history-row" });
        fillRow(row, job);
        row.onclick = () => openJob(job.id);
        return row;
      }),
    );
  }

  async function openJob(id) {
    try {
      show(await api(jobPath(id)));
    } catch (err) {
      showError($("history-error"), err);
    }
  }

  $("history-refresh").onclick = refreshHistory;

  async function start() {
    $("load-error").hidden = true;
    try {
      service = await api("v1/service");
    } catch (err) {
      if (err.status !== 401) showError($("load-error"), err);
      return;
    }
    $("title").textContent = service.title;
    $("subtitle").textContent = `${service.name} ${service.version}`;
    document.title = `${service.title} · console`;
    buildForm();
    refreshHistory();
  }

  start();
})();

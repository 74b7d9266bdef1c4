// The captioner page: choose or drop a photo, POST it to api/caption, show the words, their attention
// (drawn as the PNG figures draw it: heat normalised to 0-255, bilinear upsampling, the server's colour map
// at the server's alpha) and the n-best beams. Plain JavaScript, no build step, nothing from other sites.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    drop: $("drop"), file: $("file"), empty: $("empty"), stage: $("stage"), photo: $("photo"), overlay: $("overlay"),
    tag: $("tag"), busy: $("busy"), another: $("another"), legend: $("legend"), legendBar: $("legend-bar"),
    beam: $("beam"), beamValue: $("beam-value"), error: $("error"), errorText: $("error-text"), intro: $("intro"),
    result: $("result"), words: $("words"), play: $("play"), playText: $("play-text"), beams: $("beams"),
    timing: $("timing"), model: $("model"), details: $("model-details"), formats: $("formats"),
  };
  const SIZE = 224; // the overlay's resolution: the model's input size, as in the PNG figures
  const NO_SPACE_BEFORE = new Set([".", ",", "!", "?", ";", ":", "'s", ")", "%"]);
  const state = {
    file: null, url: null, result: null, active: -1, pinned: -1, timer: null, request: 0,
    limits: { max_upload_bytes: 20 * 2 ** 20, max_beam_size: 10, formats: ["image/jpeg", "image/png", "image/webp"] },
    colors: null,
  };
  window.captionerPage = state; // for tests and the curious

  // -- what the server says about itself ------------------------------------------------------------------
  async function getJSON(path) {
    const response = await fetch(path);
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  }

  function megabytes(bytes) {
    return bytes >= 2 ** 20 / 10 ? `${(bytes / 2 ** 20).toFixed(1).replace(/\.0$/, "")} MB` : `${Math.ceil(bytes / 1024)} KB`;
  }

  function fmt(x, digits = 3) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  function showModel(m) {
    const parts = [m.name, m.epoch != null ? `epoch ${m.epoch}` : null, `${m.vocabulary_size.toLocaleString()} words`,
      m.fine_tuned ? "fine-tuned" : null, m.device];
    el.model.textContent = parts.filter(Boolean).join(" · ");
    const rows = [
      ["Model", m.name],
      ["Epoch", m.epoch ?? "–"],
      ["Chosen by", { val_cider_d: "validation CIDEr-D", neg_val_loss: "validation loss" }[m.selected_by] ?? m.selected_by ?? "–"],
      ["Validation", `CIDEr-D ${fmt(m.validation.cider_d)} · loss ${fmt(m.validation.loss)} · perplexity ${fmt(m.validation.perplexity, 2)}`],
      ["Vocabulary", `${m.vocabulary_size.toLocaleString()} words`],
      ["Encoder", `ResNet50 ${m.encoder.layer}, weights ${m.encoder.weights ?? "?"}${m.fine_tuned ? `, fine-tuned (${m.finetune})` : ", frozen"}`],
      ["Decoder", `embedding ${m.decoder.embed_dim}, hidden ${m.decoder.hidden_dim}, attention ${m.decoder.attention_dim}`],
      ["Longest caption", `${m.max_words} words`],
      ["Device", m.device],
    ];
    el.details.replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = String(v);
      return [dt, dd];
    }));
  }

  async function init() {
    try {
      const [health, model, colormap] = await Promise.all([getJSON("api/health"), getJSON("api/model"), getJSON("api/colormap")]);
      state.limits = health.limits;
      el.beam.max = String(health.limits.max_beam_size);
      el.formats.textContent = `JPEG, PNG or WebP, up to ${megabytes(health.limits.max_upload_bytes)}`;
      showModel(model);
      state.colors = colormap.colors;
      document.documentElement.style.setProperty("--overlay-alpha", String(colormap.alpha));
      const stops = [];
      for (let i = 0; i < 256; i += 17) stops.push(`rgb(${colormap.colors[i].join(",")})`);
      el.legendBar.style.background = `linear-gradient(90deg, ${stops.join(", ")})`;
    } catch (e) {
      el.model.textContent = "server not reachable";
      showError("The server did not answer. Is cli.py serve still running?");
    }
  }

  // -- errors and the busy sign ----------------------------------------------------------------------------
  function sentence(text) {
    const t = String(text).trim();
    return t ? t[0].toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".") : "Something went wrong.";
  }

  function showError(text) {
    el.errorText.textContent = sentence(text);
    el.error.hidden = false;
  }

  function hideError() {
    el.error.hidden = true;
  }

  function setBusy(busy) {
    el.busy.hidden = !busy;
    el.drop.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // -- choosing a photo ------------------------------------------------------------------------------------
  function check(file) {
    if (file.size === 0) return "this file is empty";
    if (file.type && !state.limits.formats.includes(file.type)) {
      return file.type.startsWith("image/")
        ? `${file.type.slice(6).toUpperCase()} images are not supported: use a JPEG, PNG or WebP photo`
        : "this file is not an image: use a JPEG, PNG or WebP photo";
    }
    if (file.size > state.limits.max_upload_bytes) {
      return `this photo is too large (${megabytes(file.size)}): the limit is ${megabytes(state.limits.max_upload_bytes)}`;
    }
    return null;
  }

  function clearPhoto() {
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = null;
    state.file = null;
    el.photo.removeAttribute("src");
    el.stage.hidden = true;
    el.empty.hidden = false;
    el.another.hidden = true;
    el.drop.dataset.state = "empty";
  }

  function clearResult() {
    stop();
    state.result = null;
    el.result.hidden = true;
    el.legend.hidden = true;
    el.intro.hidden = false;
    show(-1);
  }

  function pick(file) {
    if (!file) return;
    hideError();
    const problem = check(file);
    if (problem) {
      showError(problem);
      return;
    }
    clearResult();
    if (state.url) URL.revokeObjectURL(state.url);
    state.file = file;
    state.url = URL.createObjectURL(file);
    el.photo.onload = () => {
      el.photo.parentElement.style.setProperty("--ar", `${el.photo.naturalWidth} / ${el.photo.naturalHeight}`);
    };
    el.photo.src = state.url;
    el.stage.hidden = false;
    el.empty.hidden = true;
    el.another.hidden = false;
    el.drop.dataset.state = "photo";
    caption();
  }

  el.file.addEventListener("change", () => {
    pick(el.file.files[0]);
    el.file.value = ""; // choosing the same file again still counts
  });

  let dragDepth = 0;
  window.addEventListener("dragenter", (e) => {
    e.preventDefault();
    dragDepth += 1;
    el.drop.classList.add("dragging");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.drop.classList.remove("dragging");
  });
  window.addEventListener("dragover", (e) => e.preventDefault()); // a drop anywhere is ours, not a navigation
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    el.drop.classList.remove("dragging");
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) pick(files[0]);
  });
  window.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.kind === "file");
    if (item) pick(item.getAsFile());
  });

  // -- captioning ------------------------------------------------------------------------------------------
  async function caption() {
    if (!state.file) return;
    const id = ++state.request; // a newer request makes this one's answer stale
    stop();
    hideError();
    setBusy(true);
    const form = new FormData();
    form.append("image", state.file, "photo");
    form.append("beam_size", el.beam.value);
    let response, body = null;
    try {
      response = await fetch("api/caption", { method: "POST", body: form });
      body = await response.json().catch(() => null);
    } catch (e) {
      if (id === state.request) {
        setBusy(false);
        showError("The server could not be reached. Is cli.py serve still running?");
      }
      return;
    }
    if (id !== state.request) return;
    setBusy(false);
    if (!response.ok) {
      showError(body && body.error ? body.error : `the server answered ${response.status} ${response.statusText}`);
      if (response.status >= 400 && response.status < 500) {
        clearResult();
        clearPhoto();
      }
      return;
    }
    render(body);
  }

  function render(result) {
    state.result = result;
    state.active = -1;
    state.pinned = -1;
    el.words.replaceChildren();
    if (!result.words.length) {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = "The model wrote no words for this photo.";
      el.words.append(none);
    }
    let token = null; // a word and the punctuation after it, which never wraps away from it
    result.words.forEach((word, i) => {
      if (!token || !NO_SPACE_BEFORE.has(word)) {
        if (token) el.words.append(" ");
        token = document.createElement("span");
        token.className = "token";
        el.words.append(token);
      }
      const b = document.createElement("button");
      b.type = "button";
      b.className = NO_SPACE_BEFORE.has(word) && i > 0 ? "word punct" : "word";
      b.textContent = word;
      b.dataset.index = String(i);
      token.append(b);
    });
    el.beams.replaceChildren(...result.beams.map((beam) => {
      const li = document.createElement("li");
      li.className = "beam";
      const text = document.createElement("span");
      text.className = "beam-text";
      text.textContent = beam.caption || "(no words)";
      const score = document.createElement("span");
      score.className = "beam-score";
      score.textContent = beam.score.toFixed(3);
      score.title = `per-word probability ${(Math.exp(beam.score) * 100).toFixed(1)}%`;
      const bar = document.createElement("span");
      bar.className = "beam-bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(2, Math.exp(beam.score) * 100).toFixed(1)}%`;
      bar.append(fill);
      li.append(text, score, bar);
      return li;
    }));
    el.timing.textContent = `${result.image.width} × ${result.image.height} px · beam ${result.beam_size} · ` +
      `captioned in ${result.seconds.toFixed(2)} s on ${result.model.device}`;
    el.play.disabled = !result.words.length;
    el.intro.hidden = true;
    el.result.hidden = false;
    el.legend.hidden = false;
  }

  el.beam.addEventListener("input", () => { el.beamValue.textContent = el.beam.value; });
  el.beam.addEventListener("change", () => caption());

  // -- attention -------------------------------------------------------------------------------------------
  const ctx = el.overlay.getContext("2d");

  function draw(alpha) {
    // As pipeline/figures.py heat_map: heat = uint8(alpha / max * 255) on the grid, read bilinearly at
    // x * n / 224 (the encoder's cell j is centred on pixel 32 j, edges clamped), then the colour map's entry.
    const n = Math.round(Math.sqrt(alpha.length));
    const max = Math.max(...alpha, 1e-12);
    const heat = alpha.map((a) => Math.floor((a / max) * 255));
    const image = ctx.createImageData(SIZE, SIZE);
    const axis = [];
    for (let i = 0; i < SIZE; i++) {
      const s = Math.min(Math.max((i * n) / SIZE, 0), n - 1);
      const lo = Math.floor(s);
      axis.push([lo, Math.min(lo + 1, n - 1), s - lo]);
    }
    let k = 0;
    for (let y = 0; y < SIZE; y++) {
      const [y0, y1, fy] = axis[y];
      for (let x = 0; x < SIZE; x++) {
        const [x0, x1, fx] = axis[x];
        const top = heat[y0 * n + x0] * (1 - fx) + heat[y0 * n + x1] * fx;
        const bottom = heat[y1 * n + x0] * (1 - fx) + heat[y1 * n + x1] * fx;
        const rgb = state.colors[Math.round(top * (1 - fy) + bottom * fy)];
        image.data[k] = rgb[0];
        image.data[k + 1] = rgb[1];
        image.data[k + 2] = rgb[2];
        image.data[k + 3] = 255;
        k += 4;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function show(i) {
    state.active = i;
    for (const b of el.words.querySelectorAll(".word")) {
      b.classList.toggle("active", Number(b.dataset.index) === i);
      b.classList.toggle("pinned", Number(b.dataset.index) === state.pinned);
    }
    if (i < 0 || !state.result || !state.colors) {
      el.overlay.classList.remove("on");
      el.tag.hidden = true;
      return;
    }
    draw(state.result.attention[i]);
    el.overlay.classList.add("on");
    el.tag.textContent = state.result.words[i];
    el.tag.hidden = false;
  }

  const wordIndex = (target) => {
    const b = target instanceof Element ? target.closest(".word") : null;
    return b ? Number(b.dataset.index) : -1;
  };
  el.words.addEventListener("pointerover", (e) => {
    if (e.pointerType === "mouse" && !state.timer && wordIndex(e.target) >= 0) show(wordIndex(e.target));
  });
  el.words.addEventListener("pointerleave", (e) => {
    if (e.pointerType === "mouse" && !state.timer) show(state.pinned);
  });
  el.words.addEventListener("click", (e) => {
    const i = wordIndex(e.target);
    if (i < 0) return;
    stop();
    state.pinned = state.pinned === i ? -1 : i; // a tap pins a word's map; a second tap lets it go
    show(state.pinned === -1 ? (e.pointerType === "mouse" ? i : -1) : i);
  });
  el.words.addEventListener("focusin", (e) => {
    if (!state.timer && wordIndex(e.target) >= 0) show(wordIndex(e.target));
  });

  // -- play ------------------------------------------------------------------------------------------------
  function stop() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
    el.play.classList.remove("playing");
    el.playText.textContent = "Play";
  }

  el.play.addEventListener("click", () => {
    if (state.timer) {
      stop();
      show(state.pinned);
      return;
    }
    if (!state.result || !state.result.words.length) return;
    let i = 0;
    show(i);
    el.play.classList.add("playing");
    el.playText.textContent = "Stop";
    state.timer = setInterval(() => {
      i += 1;
      if (i >= state.result.words.length) {
        stop();
        show(state.pinned);
      } else {
        show(i);
      }
    }, 900);
  });

  init();
})();

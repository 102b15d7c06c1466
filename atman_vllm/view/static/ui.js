// The page of /ui and of `atman-vllm view`: renders the JSON contract of
// POST /v1/explain. Plain JS, no libraries, nothing fetched but the API.
// config (built by atman_vllm/view/html.py): {result, api: null | {explain,
// completions, models}, choices, defaults, top_units}.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("atman-config").textContent);
  const $ = (id) => document.getElementById(id);
  let result = null;
  let current = 0;
  const controls = [];

  // Spans are (start, length) in code points (the contract); JS strings index
  // UTF-16 code units, so every slice goes through an array of code points.
  const codePoints = (s) => Array.from(s);
  const sliceCp = (chars, start, length) => chars.slice(start, start + length).join("");

  // The same scale as atman_vllm/view/scale.py: largest |score|, clipped ratio.
  const scaleOf = (exp) => Math.max(0, ...exp.prompt_scores.concat(exp.target_scores).map((s) => Math.abs(s.score)));
  const strength = (score, scale) => (scale > 0 ? Math.min(Math.abs(score) / scale, 1) : 0);
  const signed = (x) => (x > 0 ? "+" : x < 0 ? "−" : "±") + Math.abs(x).toPrecision(4);

  function setState(state, message, isError) {
    document.body.dataset.state = state;
    $("status").textContent = message || "";
    $("status").className = isError ? "error" : "";
    $("status").setAttribute("role", isError ? "alert" : "status");
  }

  function showDetail(s, where) {
    $("detail").textContent = `${where} ${s.start}:${s.length} ${JSON.stringify(s.text)}  score ${s.score}`;
  }

  function heat(el, text, scores, scale, where) {
    el.replaceChildren();
    const chars = codePoints(text);
    let pos = 0;
    for (const s of [...scores].sort((a, b) => a.start - b.start)) {
      if (s.start > pos) el.append(sliceCp(chars, pos, s.start - pos));
      const span = document.createElement("span");
      span.className = "u " + (s.score > 0 ? "pos" : s.score < 0 ? "neg" : "zero");
      span.style.setProperty("--a", strength(s.score, scale).toFixed(4));
      span.textContent = sliceCp(chars, s.start, s.length);
      span.dataset.score = String(s.score);
      span.dataset.start = String(s.start);
      span.dataset.length = String(s.length);
      span.dataset.where = where;
      span.tabIndex = 0;
      span.title = `${JSON.stringify(s.text)}: ${s.score}`;
      span.setAttribute("aria-label", `${s.text}: score ${signed(s.score)}`);
      span.addEventListener("mouseenter", () => showDetail(s, where));
      span.addEventListener("focus", () => showDetail(s, where));
      el.append(span);
      pos = Math.max(pos, s.start + s.length);
    }
    if (pos < chars.length) el.append(chars.slice(pos).join(""));
  }

  function renderTabs() {
    const tabs = $("targets");
    tabs.replaceChildren();
    result.explanations.forEach((exp, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.setAttribute("role", "tab");
      b.setAttribute("aria-selected", String(i === current));
      const whole = exp.target.start === 0 && exp.target.length === codePoints(result.target).length;
      b.textContent = (whole ? "target " : `token ${i}: `) + JSON.stringify(exp.target.text);
      b.addEventListener("click", () => { current = i; renderCurrent(); });
      tabs.append(b);
    });
  }

  function renderTop(exp) {
    const rows = exp.prompt_scores.map((s) => [s.message === undefined ? "prompt" : `message ${s.message}`, s])
      .concat(exp.target_scores.map((s) => ["target", s]));
    rows.sort((a, b) => b[1].score - a[1].score);
    const body = $("top").tBodies[0];
    body.replaceChildren();
    rows.slice(0, config.top_units).forEach(([where, s], i) => {
      const tr = body.insertRow();
      [String(i + 1), `${where} ${s.start}:${s.length}`, JSON.stringify(s.text), signed(s.score)].forEach((v, j) => {
        const td = tr.insertCell();
        td.textContent = v;
        if (j === 0 || j === 3) td.className = "num";
      });
    });
  }

  function renderStats(wallSeconds) {
    const st = result.stats, o = result.options;
    const rows = [
      ["forks (forward passes)", `${st.forward_passes} (${st.perturbations} perturbed + 1)`],
      ["computed tokens", String(st.computed_tokens)],
      ["cached tokens (prefix cache)", String(st.cached_tokens)],
      ["server time", `${st.elapsed_s.toFixed(3)} s`],
      ["options", `${o.granularity} units, target ${o.target_granularity}, ${o.mode}, factor ${o.factor}, ` +
                  `κ ${o.kappa === null ? "off" : o.kappa}`],
    ];
    if (wallSeconds !== undefined) rows.splice(4, 0, ["round trip", `${wallSeconds.toFixed(3)} s`]);
    const dl = $("stats");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      dl.append(dt, dd);
    }
  }

  function renderCurrent() {
    const exp = result.explanations[current];
    const scale = scaleOf(exp);
    [...$("targets").children].forEach((b, i) => b.setAttribute("aria-selected", String(i === current)));
    if (result.messages) {
      // A chat: each message's content, its own scores (their spans index that content).
      const promptEl = $("heat-prompt");
      promptEl.replaceChildren();
      result.messages.forEach((m, i) => {
        const line = document.createElement("div"), label = document.createElement("b");
        const content = document.createElement("span");
        label.textContent = `${m.role}: `;
        heat(content, m.content, exp.prompt_scores.filter((s) => s.message === i), scale, `message ${i}`);
        line.append(label, content);
        promptEl.append(line);
      });
    } else {
      heat($("heat-prompt"), result.prompt, exp.prompt_scores, scale, "prompt");
    }
    $("target-block").hidden = exp.target_scores.length === 0;
    heat($("heat-target"), result.target, exp.target_scores, scale, "target");
    $("legend-min").textContent = signed(-scale);
    $("legend-max").textContent = signed(scale);
    $("legend").dataset.scale = String(scale);
    renderTop(exp);
  }

  function show(data, wallSeconds) {
    result = data;
    current = 0;
    window.atmanResult = data;  // for people poking at it in the console, and for the browser test
    $("result").hidden = false;
    renderTabs();
    renderCurrent();
    renderStats(wallSeconds);
  }

  // ---- live mode: the page of /ui talks to this server's /v1 API -----------------

  async function post(path, body) {
    const headers = { "Content-Type": "application/json" };
    const token = $("token").value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
    return data;
  }

  let modelName = null;
  async function model() {
    if (modelName === null) {
      const headers = {};
      const token = $("token").value.trim();
      if (token) headers.Authorization = "Bearer " + token;
      const r = await fetch(config.api.models, { headers });
      const data = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
      modelName = data.data[0].id;
    }
    return modelName;
  }

  async function complete(prompt, extra) {
    const body = Object.assign({ model: await model(), prompt, max_tokens: Number($("max_tokens").value) || 8,
                                 temperature: 0 }, extra);
    return (await post(config.api.completions, body)).choices[0].text;
  }

  function explainOptions() {
    const opts = { granularity: $("granularity").value, target_granularity: $("target_granularity").value,
                   mode: $("mode").value, factor: Number($("factor").value) };
    if ($("kappa").value.trim() !== "") opts.kappa = Number($("kappa").value);
    return opts;
  }

  function authHeaders() {
    const headers = { "Content-Type": "application/json" };
    const token = $("token").value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    return headers;
  }

  // POST /v1/explain/stream: NDJSON lines {"progress": {done_forks, total_forks}}, then {"result"}
  // (or {"error"} once the reply has started). onProgress(done, total) as forks finish.
  async function explainStreaming(body, onProgress) {
    const r = await fetch(config.api.explain_stream, { method: "POST", headers: authHeaders(), body: JSON.stringify(body) });
    if (!r.ok) {
      const data = await r.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffered += decoder.decode(value || new Uint8Array(), { stream: !done });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.progress) onProgress(event.progress.done_forks, event.progress.total_forks);
        else if (event.result) return event.result;
        else if (event.error) throw new Error(event.error.message || "the explanation failed");
      }
      if (done) throw new Error("the explain stream ended without a result");
    }
  }

  // The elapsed time while a call runs; explanations also report forks done.
  async function running(label, work) {
    const t0 = performance.now();
    $("progress").hidden = false;
    $("explain").disabled = true;
    const tick = setInterval(() => { $("elapsed").textContent = `${label} ${((performance.now() - t0) / 1000).toFixed(1)} s`; }, 100);
    setState("running", label + "…");
    try {
      return await work();
    } finally {
      clearInterval(tick);
      $("progress").hidden = true;
      $("explain").disabled = false;
    }
  }

  async function explain() {
    const prompt = $("prompt").value;
    let target = $("target").value;
    try {
      await running("explaining", async () => {
        if (target === "") {
          setState("running", "generating a completion…");
          target = await complete(prompt, {});
          if (target === "") throw new Error("the model generated no text to explain; give a target");
          $("target").value = target;
        }
        const t0 = performance.now();
        const data = await explainStreaming({ prompt, target, options: explainOptions() }, (done, total) => {
          setState("running", `explaining: ${done} of ${total} forward passes done…`);
        });
        show(data, (performance.now() - t0) / 1000);
      });
      setState("done", "");
    } catch (e) {
      setState("error", String(e.message || e), true);
    }
  }

  function addSelectedControl() {
    const box = $("prompt");
    const text = box.value;
    // selectionStart/End count UTF-16 units; controls take code points.
    const start = codePoints(text.slice(0, box.selectionStart)).length;
    const length = codePoints(text.slice(box.selectionStart, box.selectionEnd)).length;
    if (length === 0) { setState("error", "select a span of the prompt first", true); return; }
    controls.push({ start, length, factor: Number($("steer_factor").value) });
    renderControls();
  }

  function renderControls() {
    const chars = codePoints($("prompt").value);
    const list = $("steer_list");
    list.replaceChildren();
    for (const c of controls) {
      const li = document.createElement("li");
      li.textContent = `${JSON.stringify(sliceCp(chars, c.start, c.length))} (${c.start}:${c.length}) × ${c.factor}`;
      list.append(li);
    }
  }

  async function steer() {
    const prompt = $("prompt").value;
    try {
      await running("generating", async () => {
        $("plain_out").textContent = await complete(prompt, {});
        $("steered_out").textContent = await complete(prompt, { controls, control_mode: $("control_mode").value });
      });
      setState("done", "");
    } catch (e) {
      setState("error", String(e.message || e), true);
    }
  }

  function fillSelect(id, values, chosen) {
    const sel = $(id);
    for (const v of values) sel.add(new Option(v, v, false, v === chosen));
  }

  function initLive() {
    const d = config.defaults, c = config.choices;
    fillSelect("granularity", c.granularity, d.granularity);
    fillSelect("target_granularity", c.target_granularity, d.target_granularity);
    fillSelect("mode", c.mode, d.mode);
    fillSelect("control_mode", c.mode, d.mode);
    $("factor").value = d.factor;
    // Inputs may come from the address (?prompt=...&target=...&granularity=word&run=1),
    // so a link can open a ready explanation.
    const q = new URLSearchParams(location.search);
    for (const id of ["prompt", "target", "max_tokens", "granularity", "target_granularity", "mode", "factor", "kappa"]) {
      if (q.has(id)) $(id).value = q.get(id);
    }
    $("form").hidden = false;
    $("steer").hidden = false;
    $("form").addEventListener("submit", (ev) => { ev.preventDefault(); explain(); });
    $("steer_add").addEventListener("click", addSelectedControl);
    $("steer_clear").addEventListener("click", () => { controls.length = 0; renderControls(); });
    $("steer_run").addEventListener("click", steer);
    if (q.get("run") === "1" && $("prompt").value) explain();
  }

  if (config.api) initLive();
  if (config.result) { show(config.result); setState("done", ""); }
})();

// The search page. Plain browser JavaScript, no build step: it talks to the service's
// public API (relative URLs, so it works behind a path prefix) and shows every failure
// in the alert region instead of swallowing it.
"use strict";

(() => {
  const KEY_STORAGE = "convirt.apiKey";
  const READY_RETRY_MS = 5000;
  // Observations shown as chips: positives and uncertain ones; negatives would drown them.
  const POSITIVE = 1;
  const UNCERTAIN = -1;
  const TASK_TITLES = {
    image_to_image: "image → image",
    text_to_image: "text → image",
    zero_shot: "zero-shot",
    linear_probe: "linear probe",
  };
  const METHOD_TITLES = {
    model: "ConVIRT",
    backbone: "backbone only",
    random: "random",
    random_expected: "random (expected)",
    prompts: "prompts",
    knn: "k-NN vote",
    chance: "chance",
    imagenet: "ImageNet",
    random_init: "random init",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("service-status"),
    modelInfo: $("model-info"),
    modelWarning: $("model-warning"),
    queryFigure: $("query-figure"),
    queryImage: $("query-image"),
    queryCaption: $("query-caption"),
    alert: $("alert"),
    alertTitle: $("alert-title"),
    alertDetail: $("alert-detail"),
    alertClose: $("alert-close"),
    textForm: $("text-form"),
    query: $("query"),
    k: $("k"),
    dropZone: $("drop-zone"),
    file: $("file"),
    queryFile: $("query-file"),
    results: $("results"),
    summary: $("results-summary"),
    evaluation: $("evaluation"),
    evaluationMeta: $("evaluation-meta"),
    evaluationTable: $("evaluation-table"),
    settings: $("settings"),
    keyForm: $("key-form"),
    apiKey: $("api-key"),
    keyForget: $("key-forget"),
    keyState: $("key-state"),
    detail: $("detail"),
    detailTitle: $("detail-title"),
    detailClose: $("detail-close"),
    detailImage: $("detail-image"),
    detailLabels: $("detail-labels"),
    detailMeta: $("detail-meta"),
    detailReport: $("detail-report"),
    detailSimilar: $("detail-similar"),
    findings: $("findings"),
    findingsMeta: $("findings-meta"),
    findingsTable: $("findings-table"),
    detailFindingsMeta: $("detail-findings-meta"),
    detailFindings: $("detail-findings"),
  };

  // Object URLs of the thumbnails on screen, revoked when the results are replaced.
  let objectUrls = [];
  // Each search gets a number; answers of an older search arriving late are dropped.
  let searchSeq = 0;
  let detailImageId = null;
  // Object URL of the query image shown beside the results (revoked by the next query).
  let queryUrl = null;
  // Each query image gets a number; a stored thumbnail arriving after a newer query is dropped.
  let querySeq = 0;

  class ApiError extends Error {
    constructor(title, detail, status, code) {
      super(detail ? `${title}: ${detail}` : title);
      this.title = title;
      this.detail = detail;
      this.status = status;
      this.code = code;
    }
  }

  // ---------------------------------------------------------------- API key

  function storedKey() {
    try {
      return window.localStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";  // storage disabled: work without a key
    }
  }

  function saveKey(value) {
    try {
      if (value) window.localStorage.setItem(KEY_STORAGE, value);
      else window.localStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      showError(new ApiError("The key cannot be kept", "this browser refuses local storage"));
    }
    showKeyState();
  }

  function showKeyState() {
    el.keyState.textContent = storedKey()
      ? "A key is saved in this browser."
      : "No key saved: requests are sent without one.";
  }

  // ---------------------------------------------------------------- API calls

  async function problemOf(response) {
    // RFC 9457 problems carry title/detail; anything else falls back to the status line.
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const title = (body && body.title) || response.statusText || `HTTP ${response.status}`;
    let detail = body && body.detail ? String(body.detail) : "";
    if (body && Array.isArray(body.errors) && body.errors.length) {
      const fields = body.errors.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`);
      detail = detail ? `${detail} (${fields.join("; ")})` : fields.join("; ");
    }
    return new ApiError(title, detail, response.status, body && body.code);
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    if (key) headers.set("X-API-Key", key);
    if (!headers.has("Accept")) headers.set("Accept", "application/json, application/problem+json");
    let response;
    try {
      response = await fetch(path, { ...options, headers, credentials: "same-origin" });
    } catch (err) {
      throw new ApiError("The service cannot be reached", String(err && err.message ? err.message : err));
    }
    if (!response.ok) throw await problemOf(response);
    return response;
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    return response.json();
  }

  // Thumbnails go through fetch so the API key travels with them; <img> shows a blob URL.
  // The service's URLs are host-relative with its root path included, so they are used as is.
  async function thumbnailUrl(url) {
    const response = await api(url, { headers: { Accept: "image/png" } });
    const objectUrl = URL.createObjectURL(await response.blob());
    objectUrls.push(objectUrl);
    return objectUrl;
  }

  // ---------------------------------------------------------------- messages

  function showError(err) {
    const title = err instanceof ApiError ? err.title : "Something went wrong";
    let detail = err instanceof ApiError ? err.detail : String(err && err.message ? err.message : err);
    if (err instanceof ApiError && err.status === 401) {
      detail = `${detail || "an API key is required"}. Enter the key under “API key” below.`;
      el.settings.open = true;
    }
    el.alertTitle.textContent = title;
    el.alertDetail.textContent = detail || "";
    el.alert.hidden = false;
  }

  function clearError() {
    el.alert.hidden = true;
    el.alertTitle.textContent = "";
    el.alertDetail.textContent = "";
  }

  // ---------------------------------------------------------------- service status

  async function checkReady() {
    try {
      const ready = await apiJson("ready");
      el.status.textContent = `Ready · ${ready.images} images · model ${shortId(ready.model_id)}`;
      el.status.dataset.state = "ready";
      showModel(ready.model);
      loadEvaluation();
    } catch (err) {
      el.status.textContent = `Not ready: ${err.detail || err.title}`;
      el.status.dataset.state = "not-ready";
      window.setTimeout(checkReady, READY_RETRY_MS);
    }
  }

  // Which model answers, where it comes from and what it learned on: results mean little
  // without it. The warning (the synthetic demo) stays on screen for as long as it serves.
  function showModel(model) {
    if (!model) return;
    const origin = model.origin === "imported"
      ? `imported${model.source ? ` from ${model.source}` : ""}`
      : `trained here${model.source ? ` (${model.source})` : ""}`;
    el.modelInfo.textContent =
      `Model: ${model.name} · ${origin} · training data: ${model.training_data} · ${model.dim}-d`;
    el.modelInfo.hidden = false;
    el.modelWarning.textContent = model.warning || "";
    el.modelWarning.hidden = !model.warning;
  }

  function shortId(modelId) {
    const text = String(modelId || "");
    const [scheme, digest] = text.includes(":") ? text.split(":", 2) : ["", text];
    return digest ? `${scheme ? scheme + ":" : ""}${digest.slice(0, 12)}` : text;
  }

  // ---------------------------------------------------------------- search

  async function runSearch(describe, request) {
    const seq = ++searchSeq;
    clearError();
    el.results.setAttribute("aria-busy", "true");
    el.summary.textContent = `Finding studies ${describe}…`;
    try {
      const answer = await request();
      if (seq !== searchSeq) return;
      renderResults(answer, describe);
    } catch (err) {
      if (seq !== searchSeq) return;
      // Old results under a failed search would read as its answer.
      releaseThumbnails();
      el.results.replaceChildren();
      el.summary.textContent = "The search failed.";
      showError(err);
    } finally {
      if (seq === searchSeq) el.results.setAttribute("aria-busy", "false");
    }
  }

  function wantedK() {
    return Number.parseInt(el.k.value, 10) || 12;
  }

  // ---------------------------------------------------------------- query image

  function clearQueryImage() {
    querySeq += 1;
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = null;
    el.queryImage.removeAttribute("src");
    el.queryImage.hidden = false;
    el.queryCaption.textContent = "";
    el.queryFigure.hidden = true;
  }

  // Browsers draw PNG and JPEG themselves; a DICOM is named but cannot be drawn here.
  function showQueryFile(file) {
    clearQueryImage();
    const drawable = file.type === "image/png" || file.type === "image/jpeg";
    if (drawable) {
      queryUrl = URL.createObjectURL(file);
      el.queryImage.src = queryUrl;
      el.queryImage.alt = `Query image ${file.name}`;
      el.queryCaption.textContent = `Query: ${file.name}`;
    } else {
      el.queryImage.hidden = true;
      el.queryCaption.textContent = `Query: ${file.name} (a DICOM file: the browser cannot draw it)`;
    }
    el.queryFigure.hidden = false;
  }

  function showQueryStored(imageId) {
    clearQueryImage();
    const seq = querySeq;
    el.queryImage.alt = `Query image ${imageId} (thumbnail)`;
    el.queryCaption.textContent = `Query: stored image ${imageId}`;
    el.queryFigure.hidden = false;
    api(`images/${imageId}/thumbnail`, { headers: { Accept: "image/png" } })
      .then((response) => response.blob())
      .then((blob) => {
        if (seq !== querySeq) return;
        queryUrl = URL.createObjectURL(blob);
        el.queryImage.src = queryUrl;
      })
      .catch((err) => { el.queryImage.alt = `Thumbnail unavailable: ${err.detail || err.title}`; });
  }

  function searchText(event) {
    event.preventDefault();
    clearQueryImage();
    const query = el.query.value;
    hideUploadFindings();
    // Sent as typed: the service decides what is acceptable and says why not.
    runSearch(`for “${query.trim()}”`, () =>
      apiJson("search/text", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query, k: wantedK() }),
      }),
    );
  }

  function searchFile(file) {
    if (!file) return;
    el.queryFile.hidden = false;
    el.queryFile.textContent = `Example image: ${file.name} (${formatBytes(file.size)})`;
    showQueryFile(file);
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("k", String(wantedK()));
    runSearch(`like example image ${file.name}`, () =>
      apiJson("search/image", { method: "POST", body: form }),
    );
    classifyFile(file);
  }

  function searchSimilar(imageId) {
    hideUploadFindings();
    showQueryStored(imageId);
    runSearch(`like image ${imageId}`, () =>
      apiJson("search/image", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: imageId, k: wantedK() }),
      }),
    );
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  }

  // ---------------------------------------------------------------- results

  function releaseThumbnails() {
    for (const url of objectUrls) URL.revokeObjectURL(url);
    objectUrls = [];
  }

  function renderResults(answer, describe) {
    releaseThumbnails();
    el.results.replaceChildren();
    const hits = answer.hits || [];
    el.summary.textContent = hits.length
      ? `${hits.length} closest ${hits.length === 1 ? "study" : "studies"} ${describe} · ${Math.round(answer.took_ms)} ms`
      : `No stored studies found ${describe}.`;
    for (const hit of hits) el.results.append(resultCard(hit));
  }

  function resultCard(hit) {
    const item = document.createElement("li");
    item.className = "result";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "result-button";
    button.dataset.imageId = String(hit.image_id);
    const positives = Object.entries(hit.labels || {}).filter(([, v]) => v === POSITIVE).map(([n]) => n);
    button.setAttribute(
      "aria-label",
      `Result ${hit.rank}: image ${hit.image_id}, score ${hit.score.toFixed(3)}` +
        (positives.length ? `, ${positives.join(", ")}` : "") + ". Show details",
    );
    button.addEventListener("click", () => openDetail(hit.image_id));

    const frame = document.createElement("div");
    frame.className = "thumb";
    const img = document.createElement("img");
    img.alt = `Thumbnail of image ${hit.image_id}`;
    img.decoding = "async";
    frame.append(img);
    thumbnailUrl(hit.thumbnail_url).then(
      (url) => { img.src = url; },
      (err) => { frame.classList.add("thumb-missing"); img.alt = `Thumbnail unavailable: ${err.detail || err.title}`; },
    );

    const body = document.createElement("div");
    body.className = "result-body";
    const head = document.createElement("div");
    head.className = "result-head";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    score.title = "Cosine similarity (higher is closer)";
    head.append(rank, score);
    const meta = document.createElement("p");
    meta.className = "result-meta";
    meta.textContent = [hit.view_position, hit.study_ref].filter(Boolean).join(" · ") || `image ${hit.image_id}`;
    body.append(head, meta, labelChips(hit.labels));

    button.append(frame, body);
    item.append(button);
    // Beside the button, not in it: a link inside a button is neither valid nor reachable.
    const link = viewerLink(hit.viewer_url);
    if (link) item.append(link);
    return item;
  }

  // A link to the study in the PACS viewer; null without one. The server builds the URL
  // from its configured template; only http(s) is ever turned into a link.
  function viewerLink(url) {
    if (typeof url !== "string" || !/^https?:\/\//i.test(url)) return null;
    const link = document.createElement("a");
    link.className = "viewer-link";
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.textContent = "Open study in viewer";
    return link;
  }

  function labelChips(labels) {
    const list = document.createElement("ul");
    list.className = "chips";
    list.setAttribute("aria-label", "Labels");
    const entries = Object.entries(labels || {})
      .filter(([, v]) => v === POSITIVE || v === UNCERTAIN)
      .sort(([a, va], [b, vb]) => vb - va || a.localeCompare(b));
    for (const [name, value] of entries) {
      const chip = document.createElement("li");
      chip.className = value === POSITIVE ? "chip" : "chip chip-uncertain";
      chip.textContent = value === POSITIVE ? name : `${name}?`;
      if (value === UNCERTAIN) chip.title = `${name}: uncertain`;
      list.append(chip);
    }
    if (!entries.length) {
      const chip = document.createElement("li");
      chip.className = "chip chip-none";
      chip.textContent = labels ? "no positive label" : "unlabelled";
      list.append(chip);
    }
    return list;
  }

  // ---------------------------------------------------------------- detail

  async function openDetail(imageId) {
    clearError();
    let image;
    try {
      image = await apiJson(`images/${imageId}`);
    } catch (err) {
      showError(err);
      return;
    }
    detailImageId = image.id;
    el.detailTitle.textContent = `Image ${image.id}`;
    el.detailImage.removeAttribute("src");
    el.detailImage.alt = `Radiograph ${image.id} (thumbnail)`;
    thumbnailUrl(image.thumbnail_url).then(
      (url) => { if (detailImageId === image.id) el.detailImage.src = url; },
      (err) => { el.detailImage.alt = `Thumbnail unavailable: ${err.detail || err.title}`; },
    );
    el.detailLabels.replaceChildren(...labelChips(image.labels).children);
    const rows = [
      ["Study", image.study_ref],
      ["PACS study", image.study_instance_uid],
      ["Viewer", viewerLink(image.viewer_url)],
      ["View", image.view_position],
      ["Modality", image.modality],
      ["Format", image.source_format],
      ["Size", `${image.width} × ${image.height} px`],
      ["Bits", image.bits],
      ["Photometric", image.photometric],
      ["Negative labels", negatives(image.labels)],
      ["Added", new Date(image.created_at).toLocaleString()],
      ["Content hash", image.content_hash ? image.content_hash.slice(0, 16) + "…" : null],
    ];
    el.detailMeta.replaceChildren();
    for (const [name, value] of rows) {
      if (value === null || value === undefined || value === "") continue;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      if (value instanceof Node) dd.append(value);
      else dd.textContent = String(value);
      el.detailMeta.append(dt, dd);
    }
    el.detailReport.textContent = image.report_text || "No report stored for this image.";
    el.detailReport.classList.toggle("muted", !image.report_text);
    classifyStored(image.id);
    if (!el.detail.open) el.detail.showModal();
  }

  function negatives(labels) {
    const names = Object.entries(labels || {}).filter(([, v]) => v === 0).map(([n]) => n);
    return names.length ? names.sort().join(", ") : null;
  }

  // ---------------------------------------------------------------- findings

  // Each classification gets a number per target; late answers of older ones are dropped.
  const findingsSeq = { upload: 0, detail: 0 };

  async function classifyInto(target, table, meta, request) {
    const seq = ++findingsSeq[target];
    table.tBodies[0].replaceChildren();
    meta.textContent = "Classifying…";
    try {
      const answer = await request();
      if (seq !== findingsSeq[target]) return;
      renderFindings(table, meta, answer);
    } catch (err) {
      if (seq !== findingsSeq[target]) return;
      meta.textContent = `No findings: ${err.detail || err.title}`;
    }
  }

  // The findings panel belongs to the last dropped image: another kind of search hides it.
  function hideUploadFindings() {
    findingsSeq.upload += 1;
    el.findings.hidden = true;
  }

  function classifyFile(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    el.findings.hidden = false;
    classifyInto("upload", el.findingsTable, el.findingsMeta, () =>
      apiJson("classify", { method: "POST", body: form }),
    );
  }

  function classifyStored(imageId) {
    classifyInto("detail", el.detailFindings, el.detailFindingsMeta, () =>
      apiJson("classify", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: imageId }),
      }),
    );
  }

  function renderFindings(table, meta, answer) {
    const findings = [...(answer.findings || [])].sort((a, b) => b.probability - a.probability);
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const finding of findings) {
      const row = document.createElement("tr");
      row.className = "finding";
      row.dataset.finding = finding.name;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = finding.name;
      const probability = document.createElement("td");
      probability.className = "num";
      const bar = document.createElement("meter");
      bar.min = 0;
      bar.max = 1;
      bar.value = finding.probability;
      bar.setAttribute("aria-hidden", "true");
      const percent = document.createElement("span");
      percent.className = "probability";
      percent.textContent = `${(100 * finding.probability).toFixed(0)} %`;
      probability.append(bar, percent);
      const vote = document.createElement("td");
      vote.className = "num";
      const knn = finding.knn || {};
      vote.textContent = knn.neighbours
        ? `${Math.round(knn.positive_fraction * knn.neighbours)} of ${knn.neighbours} positive`
        : "no labelled neighbours";
      row.append(name, probability, vote);
      body.append(row);
    }
    const set = answer.prompt_set || {};
    meta.textContent =
      `Prompt set ${set.id} v${set.version} · model ${shortId(answer.model_id)} · ` +
      "a zero-shot estimate for orientation, not a diagnosis";
  }

  // ---------------------------------------------------------------- evaluation

  async function loadEvaluation() {
    let list;
    try {
      list = await apiJson("evaluations?limit=20");
    } catch (err) {
      // A service without evaluations (404) or not allowing them is not an error here.
      if (err.status === 404 || err.status === 405) {
        el.evaluation.hidden = true;
        return;
      }
      showError(err);
      return;
    }
    const run = (list.items || []).find((r) => r.status === "succeeded" && r.summary);
    if (!run) {
      el.evaluation.hidden = true;
      return;
    }
    renderEvaluation(run);
  }

  function metricOrder(name) {
    const match = /^p@(\d+)$/.exec(name);
    return match ? Number(match[1]) : Number.MAX_SAFE_INTEGER;
  }

  function metricTitle(name) {
    const match = /^p@(\d+)$/.exec(name);
    if (match) return `P@${match[1]}`;
    return name === "map" ? "mAP" : name;
  }

  function renderEvaluation(run) {
    const metrics = new Set();
    for (const methods of Object.values(run.summary)) {
      for (const scores of Object.values(methods)) for (const m of Object.keys(scores)) metrics.add(m);
    }
    const columns = [...metrics].sort((a, b) => metricOrder(a) - metricOrder(b) || a.localeCompare(b));
    const head = el.evaluationTable.tHead;
    const body = el.evaluationTable.tBodies[0];
    const headRow = document.createElement("tr");
    for (const [index, text] of ["Task", "Method", ...columns.map(metricTitle)].entries()) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = text;
      if (index >= 2) th.className = "num";
      headRow.append(th);
    }
    head.replaceChildren(headRow);
    body.replaceChildren();
    for (const [task, methods] of Object.entries(run.summary)) {
      for (const [method, scores] of Object.entries(methods)) {
        const row = document.createElement("tr");
        if (method === "model") row.className = "is-model";
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = TASK_TITLES[task] || task;
        const methodCell = document.createElement("td");
        methodCell.textContent = METHOD_TITLES[method] || method;
        row.append(th, methodCell);
        for (const column of columns) {
          const td = document.createElement("td");
          td.className = "num";
          const value = scores[column];
          td.textContent = typeof value === "number" ? value.toFixed(3) : "—";
          row.append(td);
        }
        body.append(row);
      }
    }
    const when = run.finished_at ? new Date(run.finished_at).toLocaleString() : "";
    el.evaluationMeta.textContent = [
      `Run ${run.id}`,
      run.protocol,
      `model ${shortId(run.model_id)}`,
      when,
    ].filter(Boolean).join(" · ");
    el.evaluation.hidden = false;
  }

  // ---------------------------------------------------------------- wiring

  function wireDropZone() {
    const zone = el.dropZone;
    const stop = (event) => { event.preventDefault(); event.stopPropagation(); };
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => { stop(event); zone.classList.add("is-dragging"); });
    }
    for (const type of ["dragleave", "dragend"]) {
      zone.addEventListener(type, (event) => { stop(event); zone.classList.remove("is-dragging"); });
    }
    zone.addEventListener("drop", (event) => {
      stop(event);
      zone.classList.remove("is-dragging");
      const files = event.dataTransfer && event.dataTransfer.files;
      if (files && files.length) searchFile(files[0]);
    });
    // A file dropped beside the zone must not make the browser navigate away to it.
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
    el.file.addEventListener("change", () => {
      const file = el.file.files && el.file.files[0];
      searchFile(file);
      // Choosing the same file again must search again.
      el.file.value = "";
    });
  }

  function init() {
    el.textForm.addEventListener("submit", searchText);
    wireDropZone();
    el.alertClose.addEventListener("click", clearError);
    el.apiKey.value = storedKey();
    showKeyState();
    el.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      saveKey(el.apiKey.value.trim());
      clearError();
      checkReady();
    });
    el.keyForget.addEventListener("click", () => {
      el.apiKey.value = "";
      saveKey("");
    });
    el.detailClose.addEventListener("click", () => el.detail.close());
    el.detail.addEventListener("click", (event) => {
      // A click on the backdrop (the dialog element itself) closes it.
      if (event.target === el.detail) el.detail.close();
    });
    el.detailSimilar.addEventListener("click", () => {
      if (detailImageId === null) return;
      el.detail.close();
      searchSimilar(detailImageId);
    });
    checkReady();
  }

  init();
})();

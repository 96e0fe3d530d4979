// Run page: start a run, then draw its timeline from live websocket events.
//
// Events are {seq, phase, ...} with durations in microseconds. When the
// websocket cannot open or closes before the "done" event, the page polls
// GET /api/runs/<id> until the run finishes, so it always ends in the
// final state.
(function () {
  const $ = (id) => document.getElementById(id);
  const readJson = (id) => { const el = $(id); return el ? JSON.parse(el.textContent) : null; };
  const workflowId = readJson("workflow-id");
  const websocketPort = readJson("websocket-port");
  let runId = readJson("existing-run-id");
  let finished = false;
  let maxDuration = 1;
  const rows = [];

  function csrfToken() {
    const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function setStatus(text, kind) {
    const badge = $("run-status");
    badge.textContent = text;
    badge.className = "badge " + (kind || "");
  }

  // One timeline row: phase colour, a bar scaled to the longest phase so far.
  function addRow(phase, label, durationUs, badge) {
    const li = document.createElement("li");
    li.dataset.phase = phase;
    const name = document.createElement("span");
    name.textContent = label;
    if (badge) {
      const b = document.createElement("span");
      b.className = "badge " + badge;
      b.textContent = badge;
      name.append(" ", b);
    }
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.background = glassboxPhaseColor(phase);
    const value = document.createElement("span");
    value.className = "num";
    value.textContent = formatMs(durationUs);
    li.append(name, bar, value);
    $("timeline").append(li);
    rows.push({ bar, durationUs });
    maxDuration = Math.max(maxDuration, durationUs);
    for (const row of rows) row.bar.style.width = `${Math.max(0.5, (100 * row.durationUs) / maxDuration)}%`;
  }

  function handleEvent(event) {
    switch (event.phase) {
      case "request": addRow("request", "request", event.duration); break;
      case "queue": addRow("queue", `queue → ${event.runner}`, event.duration); break;
      case "compile": addRow("compile", event.cache_hit ? "compile (cache hit)" : "compile", event.duration); break;
      case "cold_load":
        addRow("cold_load", `cold load · ${event.model_id}`, event.total, "cold"); break;
      case "model":
        addRow("preprocess", `preprocess · ${event.model_id}`, event.preprocess, event.cold ? null : "hot");
        addRow("inference", `inference · ${event.model_id}`, event.inference);
        addRow("postprocess", `postprocess · ${event.model_id}`, event.postprocess);
        break;
      case "step":
        if (!event.model_step) addRow("blocks", `block · ${event.step}`, event.duration);
        break;
      case "serialization": addRow("serialization", "serialization", event.duration); break;
      case "done": showFinal(event); break;
    }
  }

  function showFinal(result) {
    if (finished) return;
    finished = true;
    const ok = result.status === "succeeded";
    setStatus(ok ? "succeeded" : "failed", ok ? "hot" : "failed");
    if (result.breakdown) {
      const components = result.breakdown.components;
      addRow("overhead", "overhead", components.overhead);
      const stack = $("summary-stack");
      stack.replaceChildren();
      for (const phase of GLASSBOX_PHASES) {
        const us = components[phase.key];
        if (!us) continue;
        const part = document.createElement("span");
        part.style.background = phase.color;
        part.style.width = `${(100 * us) / result.breakdown.total}%`;
        part.title = `${phase.label}: ${formatMs(us)}`;
        stack.append(part);
      }
      for (const model of result.breakdown.models) {
        const label = model.cold ? "cold" : "hot";
        const note = model.pretrained ? "" : " (untrained architecture)";
        const li = document.createElement("li");
        li.innerHTML = `<span>model ${model.model_id}${note} <span class="badge ${label}">${label}</span></span><span></span><span></span>`;
        li.dataset.model = model.model_id;
        $("timeline").append(li);
      }
      $("summary-total").textContent = formatMs(result.breakdown.total);
      $("summary-runner").textContent = formatMs(result.breakdown.runner_total);
    }
    if (result.bill) {
      $("summary-billed").textContent = `${result.bill.billed_ms} ms`;
      $("summary-amount").textContent = formatCredits(result.bill.amount_microcredits);
      $("summary-amount").dataset.microcredits = result.bill.amount_microcredits;
    }
    $("bill-link").href = `/billing/runs/${runId}/`;
    $("summary").hidden = !result.breakdown;
    if (result.error) $("run-error").textContent = `Error: ${result.error.message}`;
    showResult();
    if ($("estimate")) showEstimate();
  }

  async function showResult() {
    const response = await fetch(`/api/runs/${runId}`, { credentials: "same-origin" });
    if (!response.ok) return;
    const run = await response.json();
    $("result-json").textContent = JSON.stringify(run.outputs, null, 2);
    drawDetections(run.outputs);
  }

  // Draw the first detections-shaped output on the input image.
  function drawDetections(outputs) {
    if (!outputs || !outputs[0] || !window.lastImageSrc) return;
    const detections = Object.values(outputs[0]).find(
      (v) => v && typeof v === "object" && Array.isArray(v.predictions) && v.image);
    const img = new Image();
    img.onload = () => {
      const canvas = $("result-canvas");
      // Hidden until there is an image to draw: a run opened later has none.
      canvas.hidden = false;
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      if (!detections) return;
      // The canvas is shown scaled down: size strokes and labels to the image.
      ctx.lineWidth = Math.max(2, img.naturalWidth / 200);
      ctx.font = `600 ${Math.max(16, img.naturalWidth / 28)}px system-ui`;
      for (const p of detections.predictions) {
        ctx.strokeStyle = ctx.fillStyle = glassboxPhaseColor("inference");
        ctx.strokeRect(p.x - p.width / 2, p.y - p.height / 2, p.width, p.height);
        ctx.fillText(`${p.class} ${p.confidence.toFixed(2)}`, p.x - p.width / 2 + 3, p.y - p.height / 2 - 4);
      }
    };
    img.src = window.lastImageSrc;
  }

  function websocketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const host = websocketPort ? `${location.hostname}:${websocketPort}` : location.host;
    return `${scheme}//${host}/ws/runs/${runId}/`;
  }

  function follow() {
    setStatus("running", "cold");
    let socket;
    try {
      socket = new WebSocket(websocketUrl());
    } catch (error) {
      poll("websocket unavailable");
      return;
    }
    socket.onopen = () => { $("transport").textContent = "live over websocket"; };
    socket.onmessage = (message) => handleEvent(JSON.parse(message.data));
    socket.onclose = () => { if (!finished) poll("websocket closed"); };
  }

  // Fallback: read the run until it finishes, then show its stored breakdown.
  async function poll(reason) {
    $("transport").textContent = `${reason}; polling the run API`;
    while (!finished) {
      const response = await fetch(`/api/runs/${runId}`, { credentials: "same-origin" });
      if (response.ok) {
        const run = await response.json();
        if (run.status === "succeeded" || run.status === "failed") {
          if (run.timing) {
            for (const phase of GLASSBOX_PHASES) {
              const us = run.timing.components[phase.key];
              if (us !== undefined && phase.key !== "overhead") addRow(phase.key, phase.label, us);
            }
          }
          showFinal({ status: run.status, breakdown: run.timing, bill: run.bill, error: run.error });
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  function fileToDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function readImage(fieldset) {
    const name = fieldset.dataset.imageInput;
    const sample = fieldset.querySelector(".image-sample").value;
    const file = fieldset.querySelector(".image-file").files[0];
    let dataUrl;
    if (file) {
      dataUrl = await fileToDataUrl(file);
    } else if (sample) {
      const blob = await (await fetch(`/samples/${sample}`)).blob();
      dataUrl = await fileToDataUrl(blob);
    } else {
      throw new Error(`choose an image for “${name}”`);
    }
    window.lastImageSrc = window.lastImageSrc || dataUrl;
    return [name, { type: "base64", value: dataUrl.split(",")[1] }];
  }

  async function startRun(event) {
    event.preventDefault();
    $("run-form-error").textContent = "";
    $("run-button").disabled = true;
    try {
      window.lastImageSrc = null;
      const inputs = Object.fromEntries(await Promise.all(
        [...document.querySelectorAll("[data-image-input]")].map(readImage)));
      Object.assign(inputs, readParameters());
      const response = await fetch(`/api/workflows/${workflowId}/runs`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ inputs, async: true, source: "ui" }),
      });
      const body = await response.json();
      if (!response.ok && response.status !== 202) throw new Error(body.message || response.statusText);
      runId = body.id;
      history.replaceState(null, "", `/runs/${runId}/`);
      $("timeline").replaceChildren();
      rows.length = 0;
      maxDuration = 1;
      finished = false;
      follow();
    } catch (error) {
      $("run-form-error").textContent = error.message;
    } finally {
      $("run-button").disabled = false;
    }
  }

  function readParameters() {
    const parameters = {};
    for (const input of document.querySelectorAll(".param")) {
      try { parameters[input.dataset.param] = JSON.parse(input.value); }
      catch { parameters[input.dataset.param] = input.value; }
    }
    return parameters;
  }

  // One line: where the run would go, its predicted total and price, or
  // which part has no history yet.
  function describeEstimate(estimate) {
    const cold = estimate.models.filter((model) => !model.hot).map((model) => model.model_id);
    const route = estimate.hot
      ? (estimate.runner ? `hot on ${estimate.runner}` : "no model to load")
      : `cold: ${cold.join(", ")} to be loaded by the runner that takes it`;
    if (estimate.total === null) {
      return `Estimate: ${route}; latency and price unknown (${estimate.unknown.join("; ")}).`;
    }
    const basis = estimate.basis.workflow_runs;
    const ms = estimate.total / 1000;
    const about = ms >= 10 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
    return `Estimate: ${route}, about ${about}, ` +
      `${formatCredits(estimate.price.amount_microcredits)} ` +
      `(medians of ${basis} earlier run${basis === 1 ? "" : "s"}).`;
  }

  async function showEstimate() {
    const target = $("estimate");
    try {
      const response = await fetch(`/api/workflows/${workflowId}/estimate`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ inputs: readParameters() }),
      });
      const body = await response.json();
      target.textContent = response.ok
        ? describeEstimate(body)
        : `No estimate: ${body.message || response.statusText}`;
    } catch (error) {
      target.textContent = `No estimate: ${error.message}`;
    }
  }

  if ($("run-form")) {
    $("run-form").addEventListener("submit", startRun);
    for (const input of document.querySelectorAll(".param")) {
      input.addEventListener("change", showEstimate);
    }
    showEstimate();
  }
  if (runId) follow();
})();

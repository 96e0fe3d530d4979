// Run page: start a run, then draw its timeline from live websocket events.
//
// Events are {seq, run_id, phase, ...} with durations in microseconds. When
// the websocket cannot open or closes before the "done" event, the page polls
// GET /api/runs/<id> until the run finishes, so it always ends in the
// final state. A "done" event over the websocket's message limit arrives
// with fields left out, and the page reads those from the run API.
//
// The page shows one run at a time, the one in its URL. Each run gets a view
// object, and every callback drops its work once a newer view has replaced
// its own, so a late event or response of an earlier run changes nothing.
// The note under the drawn result for detections whose boxes are relative
// to crops. A top-level function, so that a page test can call it.
function undrawnDetectionsNote(count) {
  if (count === 1) {
    return "1 detection is not drawn: its box is relative to a crop, and the "
      + "outputs do not give the crop's position. Set the output's coordinates "
      + "to parent to draw it.";
  }
  return `${count} detections are not drawn: their boxes are relative to crops, `
    + "and the outputs do not give the crops' positions. Set the output's "
    + "coordinates to parent to draw them.";
}

(function () {
  const $ = (id) => document.getElementById(id);
  const readJson = (id) => { const el = $(id); return el ? JSON.parse(el.textContent) : null; };
  const workflowId = readJson("workflow-id");
  // The version this page shows: runs and estimates use it, not whatever
  // version is the latest when the button is pressed.
  const workflowVersion = readJson("workflow-version");
  const websocketPort = readJson("websocket-port");
  // The server's limit on a request body (MAX_REQUEST_BYTES), in bytes.
  const maxRequestBytes = readJson("max-request-bytes");
  // The largest price cap the server accepts, in micro-credits.
  const maxPrice = readJson("max-price-microcredits");
  const existingRunId = readJson("existing-run-id");
  const finishedOnLoad = ["succeeded", "failed"].includes($("run-status").textContent);
  // Room kept in the body for everything but the images: the JSON keys and
  // the parameters, which the check adds separately.
  const BODY_OVERHEAD_BYTES = 1024;
  const MIB = 1024 * 1024;
  // The marker policy.waive() writes into a waived bill's formula.
  const WAIVE_MARKER = "# not billed:";

  // The view of the run on screen, or null before the first run.
  let current = null;
  // The input image the result boxes are drawn on, as a data URL.
  let drawnImage = null;

  function csrfToken() {
    const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function setStatus(text, kind) {
    const badge = $("run-status");
    badge.textContent = text;
    badge.className = "badge " + (kind || "");
  }

  function badge(kind, text) {
    const element = document.createElement("span");
    element.className = `badge ${kind}`;
    element.textContent = text || kind;
    return element;
  }

  // The sentence under the status that explains why a queued run has not
  // started; empty text hides it.
  function showWaiting(text) {
    const line = $("run-waiting");
    line.textContent = text;
    line.hidden = !text;
  }

  // While the run waits in the queue, show the API's reason (run.waiting)
  // and refresh it every WAITING_REFRESH_MS, until the run starts or ends.
  const WAITING_REFRESH_MS = 2000;
  async function watchQueue(view) {
    // A run that a runner takes within a second never shows a reason.
    await new Promise((resolve) => setTimeout(resolve, WAITING_REFRESH_MS / 2));
    while (view === current && !view.started && !view.finished) {
      try {
        const response = await fetch(`/api/runs/${view.id}`, { credentials: "same-origin" });
        if (response.ok) {
          const run = await response.json();
          if (view !== current || view.started || view.finished) return;
          if (run.status !== "queued") {
            showWaiting("");
            return;
          }
          showWaiting(run.waiting ? run.waiting.reason : "");
        }
      } catch (error) {
        // The next refresh tries again; the websocket or poll shows the end.
      }
      await new Promise((resolve) => setTimeout(resolve, WAITING_REFRESH_MS));
    }
  }

  // Re-enable the Run button once the run on screen has ended.
  function runEnded() {
    const button = $("run-button");
    if (button) button.disabled = false;
  }

  // One timeline row: phase colour, a bar scaled to the longest phase so far.
  function addRow(view, phase, label, durationUs, badgeKind, badgeText) {
    const li = document.createElement("li");
    li.dataset.phase = phase;
    const name = document.createElement("span");
    name.textContent = label;
    if (badgeKind) name.append(" ", badge(badgeKind, badgeText));
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.background = glassboxPhaseColor(phase);
    const value = document.createElement("span");
    value.className = "num";
    value.textContent = formatMs(durationUs);
    li.append(name, bar, value);
    $("timeline").append(li);
    view.rows.push({ bar, durationUs });
    view.maxDuration = Math.max(view.maxDuration, durationUs);
    for (const row of view.rows) {
      row.bar.style.width = `${Math.max(0.5, (100 * row.durationUs) / view.maxDuration)}%`;
    }
    return li;
  }

  // Tag the row of a model event with its model, for markUntrained.
  function addModelRow(view, event, phase, label, durationUs, badgeKind, badgeText) {
    const li = addRow(view, phase, label, durationUs, badgeKind, badgeText);
    li.dataset.modelId = event.model_id;
  }

  // The untrained badge of the billing and Models pages, with what it means.
  function untrainedBadge() {
    const element = badge("untrained");
    element.title = "untrained architecture: random weights, so the detections are meaningless";
    return element;
  }

  // Mark the rows of an untrained model once the breakdown names it, because
  // the timing events carry no pretrained flag.
  function markUntrained(modelId) {
    for (const li of $("timeline").querySelectorAll("li[data-model-id]")) {
      if (li.dataset.modelId === modelId) li.firstChild.append(" ", untrainedBadge());
    }
  }

  // A model event's step and model: two steps may call the same model.
  function modelCall(event) {
    return event.step ? `${event.step} (${event.model_id})` : event.model_id;
  }

  function handleEvent(view, event) {
    // A socket of an earlier run may still deliver a message after the
    // page moved on.
    if (view !== current || event.run_id !== view.id) return;
    // A runner sends the first events once it has taken the run; until then
    // the run waits in the queue.
    if (event.phase !== "done" && !view.started) {
      view.started = true;
      showWaiting("");
      setStatus("running", "cold");
    }
    switch (event.phase) {
      case "request": addRow(view, "request", "request", event.duration); break;
      case "queue": addRow(view, "queue", `queue → ${event.runner}`, event.duration); break;
      case "compile":
        addRow(view, "compile", event.cache_hit ? "compile (cache hit)" : "compile", event.duration);
        break;
      case "cold_load":
        addModelRow(view, event, "cold_load", `cold load · ${modelCall(event)}`, event.total,
          event.failed ? "load-failed" : "cold", event.failed ? "load failed" : "cold");
        break;
      case "model":
        addModelRow(view, event, "preprocess", `preprocess · ${modelCall(event)}`,
          event.preprocess, event.cold ? null : "hot");
        addModelRow(view, event, "inference", `inference · ${modelCall(event)}`, event.inference);
        addModelRow(view, event, "postprocess", `postprocess · ${modelCall(event)}`, event.postprocess);
        break;
      case "step":
        if (!event.model_step) addRow(view, "blocks", `block · ${event.step}`, event.duration);
        break;
      case "serialization": addRow(view, "serialization", "serialization", event.duration); break;
      case "done":
        if (event.truncated) showReducedFinal(view, event);
        else showFinal(view, event);
        break;
    }
  }

  // The run API's name for each field of a done event.
  const DONE_FIELDS_IN_RUN = { breakdown: "timing", bill: "bill", error: "error" };

  // Show the end of a run whose done event was over the websocket's message
  // limit. The fields named in event.truncated are null, so they are read
  // from the run at event.url, which the runner stores before it sends done.
  async function showReducedFinal(view, event) {
    // Nothing follows a done, and the socket's close must not start a poll
    // while the run is read.
    closeSocket(view);
    const result = { ...event };
    try {
      const response = await fetch(event.url, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP status ${response.status}`);
      const run = await response.json();
      for (const name of event.truncated) {
        if (name in DONE_FIELDS_IN_RUN) result[name] = run[DONE_FIELDS_IN_RUN[name]];
      }
    } catch (error) {
      if (view !== current) return;
      $("transport").textContent += `; reading ${event.truncated.join(", ")} `
        + `from ${event.url} failed: ${error.message}`;
    }
    showFinal(view, result);
  }

  // A model row at the end of the timeline. A model the run set up but
  // never called (no crops, or a failure before its step) was neither hot
  // nor cold. A model whose only load failed is cold with no load counted,
  // and the billing pages call it "load failed" too.
  function modelRow(model) {
    const li = document.createElement("li");
    li.dataset.model = model.model_id;
    const name = document.createElement("span");
    name.textContent = `model ${model.model_id}`;
    if (!model.pretrained) name.append(" ", untrainedBadge());
    if (model.cold && model.loads === 0) {
      name.append(" ", badge("load-failed", "load failed"));
    } else if (model.calls > 0 || model.cold) {
      name.append(" ", badge(model.cold ? "cold" : "hot"));
      // Evicted and loaded again during the run; older runs have no count.
      if (model.loads > 1) name.append(` · loaded ${model.loads} times`);
    } else {
      name.append(" · not called");
    }
    li.append(name, document.createElement("span"), document.createElement("span"));
    return li;
  }

  // The reason policy.waive() stored in a waived bill's formula.
  function waiveReason(bill) {
    const index = bill.formula.indexOf(WAIVE_MARKER);
    const reason = index < 0 ? "" : bill.formula.slice(index + WAIVE_MARKER.length).trim();
    return reason || "the run failed because of the platform";
  }

  function showBill(bill) {
    const target = $("summary-bill");
    target.replaceChildren();
    if (!bill) {
      target.textContent = "no bill";
      return;
    }
    if (!bill.billed) {
      const waived = document.createElement("strong");
      waived.id = "summary-waived";
      waived.textContent = `not billed: ${waiveReason(bill)}`;
      target.append(waived);
      return;
    }
    const billed = document.createElement("strong");
    billed.id = "summary-billed";
    billed.textContent = `${bill.billed_ms} ms`;
    const amount = document.createElement("strong");
    amount.id = "summary-amount";
    amount.textContent = formatCredits(bill.amount_microcredits);
    amount.dataset.microcredits = bill.amount_microcredits;
    target.append("billed ", billed, " for ", amount);
    if (bill.capped) {
      const capped = document.createElement("span");
      capped.id = "summary-capped";
      capped.className = "badge capped";
      capped.title = "The run's price cap lowered the amount; the platform absorbs the rest";
      capped.textContent = "capped";
      target.append(" ", capped);
    }
  }

  // The estimate a capped run stored before it was queued, next to what the
  // run took and cost.
  function showPrediction(run) {
    const target = $("run-prediction");
    const predicted = run.price_estimate;
    target.hidden = !predicted;
    if (!predicted) return;
    const start = predicted.hot ? "hot" : "cold";
    const price = predicted.amount_microcredits === null
      ? "price unknown"
      : formatCredits(predicted.amount_microcredits);
    const latency = predicted.total_us === null ? "latency unknown" : `about ${formatMs(predicted.total_us)}`;
    let actual = "";
    if (run.bill && run.timing) {
      actual = `; actual: ${formatMs(run.timing.total)}, ${formatCredits(run.bill.amount_microcredits)}`;
    }
    target.textContent = `Predicted before the run: ${start}, ${latency}, ${price}`
      + ` (price cap ${run.max_price_microcredits} µcr)${actual}.`;
  }

  function showBreakdown(view, breakdown) {
    const components = breakdown.components;
    addRow(view, "overhead", "overhead", components.overhead);
    const stack = $("summary-stack");
    stack.replaceChildren();
    for (const phase of GLASSBOX_PHASES) {
      const us = components[phase.key];
      if (!us) continue;
      const part = document.createElement("span");
      part.style.background = phase.color;
      part.style.width = `${(100 * us) / breakdown.total}%`;
      part.title = `${phase.label}: ${formatMs(us)}`;
      stack.append(part);
    }
    for (const model of breakdown.models) {
      if (!model.pretrained) markUntrained(model.model_id);
      $("timeline").append(modelRow(model));
    }
    $("summary-total").textContent = formatMs(breakdown.total);
    $("summary-runner").textContent = formatMs(breakdown.runner_total);
  }

  function showFinal(view, result) {
    if (view !== current || view.finished) return;
    view.finished = true;
    showWaiting("");
    closeSocket(view);
    const ok = result.status === "succeeded";
    setStatus(ok ? "succeeded" : "failed", ok ? "hot" : "failed");
    if (result.breakdown) showBreakdown(view, result.breakdown);
    $("summary-stack").hidden = !result.breakdown;
    $("summary-times").hidden = !result.breakdown;
    showBill(result.bill);
    $("bill-link").href = `/billing/runs/${view.id}/`;
    $("summary").hidden = !result.breakdown && !result.bill;
    if (result.error) $("run-error").textContent = `Error: ${result.error.message}`;
    runEnded();
    showResult(view);
    if ($("estimate")) showEstimate();
  }

  async function showResult(view) {
    const response = await fetch(`/api/runs/${view.id}`, { credentials: "same-origin" });
    if (!response.ok || view !== current) return;
    const run = await response.json();
    if (view !== current) return;
    showWarnings(run.warnings || []);
    showPrediction(run);
    const images = imageOutputs(run.outputs);
    showImageOutputs(images);
    $("result-json").textContent = JSON.stringify(run.outputs, elideImageData(images), 2);
    drawDetections(run.outputs);
  }

  function showWarnings(warnings) {
    const list = $("run-warnings");
    list.replaceChildren(...warnings.map((warning) => {
      const li = document.createElement("li");
      li.textContent = warning;
      return li;
    }));
    list.hidden = warnings.length === 0;
  }

  // Call visit(value, path) for every object and list inside value.
  function walk(value, path, visit) {
    if (value === null || typeof value !== "object") return;
    visit(value, path);
    if (Array.isArray(value)) {
      value.forEach((item, index) => walk(item, `${path}[${index}]`, visit));
    } else {
      for (const [key, item] of Object.entries(value)) {
        walk(item, path ? `${path}.${key}` : key, visit);
      }
    }
  }

  // Image outputs ({"type": "base64", "value": ...}, as the runner serializes
  // images), with where they are in the first batch element's outputs.
  function imageOutputs(outputs) {
    const found = [];
    if (!Array.isArray(outputs)) return found;
    walk(outputs[0], "", (value, path) => {
      if (value.type === "base64" && typeof value.value === "string") found.push({ path, value });
    });
    return found;
  }

  function showImageOutputs(images) {
    const figures = images.map(({ path, value }) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      // The runner encodes every image output as JPEG.
      img.src = `data:image/jpeg;base64,${value.value}`;
      img.alt = `output ${path}`;
      const caption = document.createElement("figcaption");
      caption.textContent = path;
      figure.append(img, caption);
      return figure;
    });
    $("result-images").replaceChildren(...figures);
    $("result-images").hidden = figures.length === 0;
  }

  // A JSON.stringify replacer that prints image data as its length.
  function elideImageData(images) {
    const shown = new Set(images.map(({ value }) => value));
    return function (key, value) {
      if (key === "value" && shown.has(this)) return `(${value.length} base64 characters, shown above)`;
      return value;
    };
  }

  // Detections ({"image": {width, height}, "predictions": [...]}) anywhere in
  // the first batch element's outputs, nested lists of crops included.
  function detectionSets(outputs) {
    const found = [];
    if (!Array.isArray(outputs)) return found;
    walk(outputs[0], "", (value) => {
      if (Array.isArray(value.predictions) && value.image && typeof value.image === "object") {
        found.push(value);
      }
    });
    return found;
  }

  // Split the predictions into those drawn on the input image and the rest.
  // A set is in the input's coordinates when it names the input as parent
  // and has the input's size: detections on the image itself, or on crops
  // with coordinates_system "parent". Boxes relative to a crop cannot be
  // mapped back, because the outputs do not give the crop's offset. A
  // detection that another output gives in the input's coordinates (the
  // same detection_id) is drawn from there, so it is not counted as left out.
  function boxesToDraw(outputs, width, height) {
    const boxes = [];
    const seen = new Set();
    const skippedIds = new Set();
    let skippedWithoutId = 0;
    for (const set of detectionSets(outputs)) {
      const sameFrame = set.image.width === width && set.image.height === height;
      for (const p of set.predictions) {
        if (!p || typeof p !== "object") continue;
        const onInput = p.parent_id === undefined || p.parent_id === drawnImage.input;
        if (!sameFrame || !onInput) {
          if (p.detection_id) skippedIds.add(p.detection_id);
          else skippedWithoutId += 1;
          continue;
        }
        // An output may repeat another's detections; draw each box once.
        if (p.detection_id && seen.has(p.detection_id)) continue;
        if (p.detection_id) seen.add(p.detection_id);
        const confidence = typeof p.confidence === "number" ? ` ${p.confidence.toFixed(2)}` : "";
        boxes.push({
          x1: p.x - p.width / 2, y1: p.y - p.height / 2,
          x2: p.x + p.width / 2, y2: p.y + p.height / 2,
          text: `${p.class}${confidence}`,
        });
      }
    }
    let skipped = skippedWithoutId;
    for (const id of skippedIds) if (!seen.has(id)) skipped += 1;
    return { boxes, skipped };
  }

  function overlapArea(a, b) {
    const w = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x);
    const h = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    return w > 0 && h > 0 ? w * h : 0;
  }

  // Place each label inside the canvas, at the first spot that covers no
  // label placed before it: above the box, inside its top, below it, then
  // further up or down. Without a free spot, the least covered one wins.
  function placeLabel(box, w, h, placed, width, height) {
    const clamp = (x, y) => ({
      x: Math.min(Math.max(0, x), Math.max(0, width - w)),
      y: Math.min(Math.max(0, y), Math.max(0, height - h)),
      w, h,
    });
    const candidates = [
      clamp(box.x1, box.y1 - h),
      clamp(box.x1, box.y1),
      clamp(box.x2 - w, box.y1 - h),
      clamp(box.x1, box.y2),
      clamp(box.x2 - w, box.y2 - h),
    ];
    for (let step = 1; step <= 12; step += 1) {
      candidates.push(clamp(box.x1, box.y1 - h - step * h), clamp(box.x1, box.y1 + step * h));
    }
    let best = null;
    let bestOverlap = Infinity;
    for (const candidate of candidates) {
      const overlap = placed.reduce((sum, rect) => sum + overlapArea(candidate, rect), 0);
      if (overlap < bestOverlap) {
        best = candidate;
        bestOverlap = overlap;
        if (overlap === 0) break;
      }
    }
    return best;
  }

  // Draw the detections that are in the input image's coordinates on it,
  // and report how many are left out.
  function drawDetections(outputs) {
    const note = $("result-note");
    note.textContent = "";
    if (!drawnImage) return;
    const img = new Image();
    img.onload = () => {
      const canvas = $("result-canvas");
      // Hidden until there is an image to draw: a run opened later has none.
      canvas.hidden = false;
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const { boxes, skipped } = boxesToDraw(outputs, img.naturalWidth, img.naturalHeight);
      // The canvas is shown scaled down: size strokes and labels to the image.
      const fontPx = Math.round(Math.max(16, img.naturalWidth / 28));
      const padding = Math.round(fontPx / 6);
      ctx.lineWidth = Math.max(2, img.naturalWidth / 200);
      ctx.font = `600 ${fontPx}px system-ui`;
      ctx.textBaseline = "top";
      const color = glassboxPhaseColor("inference");
      ctx.strokeStyle = color;
      for (const box of boxes) ctx.strokeRect(box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1);
      const placed = [];
      for (const box of boxes) {
        const w = Math.ceil(ctx.measureText(box.text).width) + 2 * padding;
        const rect = placeLabel(box, w, fontPx + 2 * padding, placed, canvas.width, canvas.height);
        placed.push(rect);
        ctx.fillStyle = color;
        ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
        ctx.fillStyle = "#fff";
        ctx.fillText(box.text, rect.x + padding, rect.y + padding);
      }
      canvas.dataset.boxes = String(boxes.length);
      canvas.dataset.labels = JSON.stringify(placed.map((r) => [r.x, r.y, r.w, r.h]));
      if (skipped) {
        note.textContent = undrawnDetectionsNote(skipped);
      }
    };
    img.src = drawnImage.src;
  }

  function websocketUrl(id) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const host = websocketPort ? `${location.hostname}:${websocketPort}` : location.host;
    return `${scheme}//${host}/ws/runs/${id}/`;
  }

  function closeSocket(view) {
    if (!view.socket) return;
    view.socket.onclose = null;
    view.socket.onmessage = null;
    view.socket.close();
    view.socket = null;
  }

  // Show run id from now on: clear what an earlier run left, close its
  // websocket, and follow this one.
  function follow(id) {
    if (current) closeSocket(current);
    const view = { id, finished: false, started: false, socket: null, rows: [], maxDuration: 1 };
    current = view;
    $("timeline").replaceChildren();
    $("summary").hidden = true;
    $("run-error").textContent = "";
    $("result-json").textContent = "";
    $("result-note").textContent = "";
    $("result-canvas").hidden = true;
    showWarnings([]);
    showImageOutputs([]);
    showWaiting("");
    setStatus("queued", "queued");
    if (!(finishedOnLoad && id === existingRunId)) watchQueue(view);
    try {
      view.socket = new WebSocket(websocketUrl(id));
    } catch (error) {
      poll(view, "websocket unavailable");
      return;
    }
    view.socket.onopen = () => {
      if (view !== current) return;
      // A run that had already finished is replayed from the server, not live.
      $("transport").textContent = finishedOnLoad && id === existingRunId
        ? "finished before this page opened; read over websocket"
        : "live over websocket";
    };
    view.socket.onmessage = (message) => handleEvent(view, JSON.parse(message.data));
    view.socket.onclose = () => { if (view === current && !view.finished) poll(view, "websocket closed"); };
  }

  // Fallback: read the run until it finishes, then show its stored breakdown.
  async function poll(view, reason) {
    $("transport").textContent = `${reason}; polling the run API`;
    while (view === current && !view.finished) {
      const response = await fetch(`/api/runs/${view.id}`, { credentials: "same-origin" });
      if (response.ok) {
        const run = await response.json();
        if (view !== current) return;
        if (run.status === "running" && !view.started) {
          view.started = true;
          showWaiting("");
          setStatus("running", "cold");
        }
        if (run.status === "succeeded" || run.status === "failed") {
          if (run.timing) {
            for (const phase of GLASSBOX_PHASES) {
              const us = run.timing.components[phase.key];
              if (us !== undefined && phase.key !== "overhead") addRow(view, phase.key, phase.label, us);
            }
          }
          showFinal(view, { status: run.status, breakdown: run.timing, bill: run.bill, error: run.error });
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

  // Return the image an input sends, as a Blob (a File is one). That is the
  // sample or the file, whichever was chosen last, because choosing one
  // clears the other (see bindImageChoice).
  async function imageSource(fieldset) {
    const name = fieldset.dataset.imageInput;
    const sample = fieldset.querySelector(".image-sample").value;
    const file = fieldset.querySelector(".image-file").files[0];
    if (sample) {
      const response = await fetch(`/samples/${sample}`);
      if (!response.ok) throw new Error(`sample image ${sample} could not be loaded (${response.status})`);
      return { name, blob: await response.blob() };
    }
    if (file) return { name, blob: file };
    throw new Error(`choose an image for “${name}”`);
  }

  function formatMiB(bytes) {
    return `${(bytes / MIB).toFixed(1)} MiB`;
  }

  // Return why a request with these images would exceed the server's body
  // limit, or null. Images travel base64-encoded, 4 characters per 3 bytes.
  function bodySizeProblem(sizes) {
    if (!maxRequestBytes || sizes.length === 0) return null;
    const other = BODY_OVERHEAD_BYTES + JSON.stringify(readParameters()).length;
    const encoded = sizes.reduce((sum, size) => sum + 4 * Math.ceil(size / 3), 0);
    if (encoded + other <= maxRequestBytes) return null;
    const total = sizes.reduce((sum, size) => sum + size, 0);
    const fits = Math.max(0, Math.floor(((maxRequestBytes - other) * 3) / 4));
    const about = `about ${Math.round(fits / MIB)} MiB`;
    const why = "(they are sent base64-encoded, which adds a third)";
    return sizes.length === 1
      ? `the image is ${formatMiB(total)}; images up to ${about} fit ${why}`
      : `the images are ${formatMiB(total)} together; up to ${about} in all fit ${why}`;
  }

  // Check the chosen files as soon as they change, before anything is read.
  function checkChosenFiles() {
    const sizes = [...document.querySelectorAll(".image-file")]
      .map((input) => input.files[0])
      .filter(Boolean)
      .map((file) => file.size);
    $("run-form-error").textContent = bodySizeProblem(sizes) || "";
  }

  // Keep an image input's sample list and file field in step. Choosing a
  // sample clears the file, and choosing a file selects the list's
  // "Your file" entry, which names the file.
  function bindImageChoice(fieldset) {
    const select = fieldset.querySelector(".image-sample");
    const fileInput = fieldset.querySelector(".image-file");
    const fileOption = select.querySelector("option[value='']");
    const showFile = () => {
      const file = fileInput.files[0];
      fileOption.textContent = file ? `Your file: ${file.name}` : "Upload a file…";
    };
    select.addEventListener("change", () => {
      if (select.value === "") return;
      fileInput.value = "";
      showFile();
      checkChosenFiles();
    });
    fileInput.addEventListener("change", () => {
      if (fileInput.files[0]) select.value = "";
      showFile();
      checkChosenFiles();
    });
  }

  // Whether #run-form-error shows why the last press of Run failed. That
  // error describes inputs as they were then, so editing any of them clears it.
  let runErrorShown = false;

  function clearRunError() {
    if (!runErrorShown) return;
    runErrorShown = false;
    $("run-form-error").textContent = "";
    $("max-price").removeAttribute("aria-invalid");
  }

  async function startRun(event) {
    event.preventDefault();
    const button = $("run-button");
    // Enter in a field submits the form even while the button is disabled.
    if (button.disabled) return;
    button.disabled = true;
    $("run-form-error").textContent = "";
    runErrorShown = false;
    try {
      const cap = priceCapField();
      const sources = await Promise.all(
        [...document.querySelectorAll("[data-image-input]")].map(imageSource));
      const problem = bodySizeProblem(sources.map(({ blob }) => blob.size));
      if (problem) throw new Error(problem);
      const inputs = {};
      let firstImage = null;
      for (const { name, blob } of sources) {
        const dataUrl = await fileToDataUrl(blob);
        firstImage = firstImage || { input: name, src: dataUrl };
        inputs[name] = { type: "base64", value: dataUrl.split(",")[1] };
      }
      Object.assign(inputs, readParameters());
      const response = await fetch(`/api/workflows/${workflowId}/runs`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({
          inputs, async: true, source: "ui", priority: priority(),
          ...versionField(), ...cap,
        }),
      });
      const body = await response.json();
      // The page was rendered for this workflow, so "not found" means it was deleted since.
      if (response.status === 404 && /not found among yours$/.test(body.message || "")) {
        throw new Error("This workflow was deleted after this page opened, so it cannot run. "
          + "Its earlier runs stay in the billing history.");
      }
      if (response.status === 409 && body.code === "price_cap_exceeded") {
        throw new Error(priceCapMessage(body));
      }
      if (!response.ok && response.status !== 202) {
        const message = body.message || response.statusText;
        throw new Error(body.hint ? `${message}. ${body.hint}` : message);
      }
      drawnImage = firstImage;
      $("run-priority-value").textContent = body.priority || priority();
      $("run-priority-note").hidden = false;
      history.replaceState(null, "", `/runs/${body.id}/`);
      // The button stays disabled until the run ends (showFinal).
      follow(body.id);
    } catch (error) {
      $("run-form-error").textContent = error.message;
      runErrorShown = true;
      button.disabled = false;
    }
  }

  // The 409 price_cap_exceeded error in the form's words: the API's message
  // and hint name the request field max_price_microcredits and the value
  // "priority economy", which this form calls the price cap and Economy.
  function priceCapMessage(body) {
    const cap = body.max_price_microcredits;
    const predicted = body.predicted_price_microcredits;
    const start = body.predicted_hot ? "hot" : "cold";
    const message = `Not started: the predicted price, ${predicted} µcr (starting ${start}), `
      + `is over the price cap of ${cap} µcr. Raise the cap to at least ${predicted} µcr`;
    const economy = body.economy_estimate;
    if (!economy) return `${message}, or clear it.`;
    const economyPrice = economy.amount_microcredits;
    if (economyPrice <= cap) {
      return `${message}, or choose Economy priority: the run then waits for runner `
        + `${economy.runner}, which has its models loaded, and is predicted to cost ${economyPrice} µcr.`;
    }
    return `${message}, or to ${economyPrice} µcr with Economy priority, which waits for runner `
      + `${economy.runner}, where its models are loaded.`;
  }

  // An empty field sends no cap. A whole number from 1 to maxPrice is sent
  // as a number. Anything else is rejected here, in the form's words and
  // with the field marked, because the API's 400 names the request field
  // max_price_microcredits and expects a JSON integer.
  function priceCapField() {
    const field = $("max-price");
    const text = field.value.trim();
    if (text === "") return {};
    if (!/^\d+$/.test(text) || BigInt(text) < 1n || BigInt(text) > BigInt(maxPrice)) {
      field.setAttribute("aria-invalid", "true");
      throw new Error(`Price cap: “${text}” is not a whole number of micro-credits `
        + `from 1 to ${maxPrice.toLocaleString("en-US")}. Enter one such as 5000 `
        + "(0.005 credits), or leave the field empty for no cap.");
    }
    return { max_price_microcredits: Number(text) };
  }

  // The run form's priority: "standard" or "economy".
  function priority() {
    return $("run-priority").value;
  }

  function versionField() {
    return workflowVersion ? { version: workflowVersion } : {};
  }

  // An empty field is left out, so the parameter's default applies, or
  // null for a parameter without one. Text
  // that is not JSON is sent as a string. Throws for a number that JSON in
  // this page cannot carry exactly: JSON.stringify would send 1e400 as
  // null, and 9007199254740993 would arrive as 9007199254740992.
  function readParameters() {
    const parameters = {};
    for (const input of document.querySelectorAll(".param")) {
      if (input.value.trim() === "") continue;
      let value;
      try { value = JSON.parse(input.value); }
      catch { parameters[input.dataset.param] = input.value; continue; }
      const problem = inexactNumber(input.value);
      if (problem !== null) {
        throw new Error(`Parameter '${input.dataset.param}': ${problem} cannot be sent exactly; `
          + "use a smaller number, or quote it to send it as text.");
      }
      parameters[input.dataset.param] = value;
    }
    return parameters;
  }

  // Return the first number in JSON text, as written, that a JavaScript
  // number cannot represent exactly (too large, or an integer that rounds),
  // or null if there is none. Numbers inside strings are skipped.
  function inexactNumber(text) {
    const tokens = /"(?:[^"\\]|\\.)*"|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
    for (const [, number] of text.matchAll(tokens)) {
      if (number === undefined) continue;
      const value = Number(number);
      if (!Number.isFinite(value)) return `the number ${number}`;
      if (/^-?\d+$/.test(number) && BigInt(number) !== BigInt(value)) {
        return `the integer ${number}`;
      }
    }
    return null;
  }

  // Describe where the figures come from, as the estimate's basis and
  // samples count them: runs of this definition for the workflow's own
  // times; for each model's call times, runs of this definition where it
  // served the same steps, else runs of any workflow.
  function describeBasis(estimate) {
    const runs = estimate.basis.workflow_runs;
    const parts = [`medians of ${runs} earlier run${runs === 1 ? "" : "s"} of this definition`];
    for (const model of estimate.models) {
      if (!model.calls || !model.samples) continue;
      const whose = model.samples_from === "definition" ? "this definition" : "any workflow";
      parts.push(`${model.model_id} call times from ${model.samples} ` +
        `run${model.samples === 1 ? "" : "s"} of ${whose}`);
    }
    return parts.join("; ");
  }

  function describeUntrained(estimate) {
    const untrained = estimate.models.filter((model) => !model.pretrained).map((model) => model.model_id);
    if (untrained.length === 0) return "";
    return untrained.length === 1
      ? `${untrained[0]} is an untrained architecture (random weights): `
        + "its timings are real, its detections meaningless."
      : `${untrained.join(", ")} are untrained architectures (random weights): `
        + "their timings are real, their detections meaningless.";
  }

  // Microseconds as "45 ms", or "4.5 ms" under 10 ms.
  function roundMs(us) {
    const ms = us / 1000;
    return ms >= 10 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
  }

  // The predicted time of each phase that takes any, in the timeline's
  // order and words (queue, compile, cold load, preprocess, ...).
  function describePhases(estimate) {
    return window.GLASSBOX_PHASES
      .filter((phase) => estimate.components[phase.key])
      .map((phase) => `${phase.label} ${roundMs(estimate.components[phase.key])}`)
      .join(" · ");
  }

  // Split the estimate into short parts, one per list item. They are where
  // the run would start (hot or cold), its latency with its phases, its
  // price, the basis of the figures or why they are unknown, and notes.
  function estimateParts(estimate) {
    const cold = estimate.models.filter((model) => !model.hot).map((model) => model.model_id);
    const taker = estimate.runner || "the runner that takes it";
    let start = `cold, ${cold.join(", ")} to be loaded by ${taker}`;
    if (estimate.models.length === 0) start = "no model to load";
    else if (estimate.hot) start = `hot on ${taker}`;
    const parts = [{ part: "start", text: `Start: ${start}` }];
    if (estimate.total === null) {
      parts.push({ part: "latency", text: "Latency: unknown" });
    } else {
      const phases = describePhases(estimate);
      parts.push({
        part: "latency", text: `Latency: about ${roundMs(estimate.total)}`,
        items: phases ? [phases] : [],
      });
    }
    // The price covers the runner's time only, so it is known while the
    // queue time, and with it the latency, is not (every runner busy).
    if (estimate.price === null) {
      parts.push({ part: "price", text: "Price: unknown" });
    } else {
      parts.push({ part: "price", text: `Price: ${formatCredits(estimate.price.amount_microcredits)}` });
      parts.push({ part: "basis", text: `Based on ${describeBasis(estimate)}.` });
      const overCap = describeOverCap(estimate);
      if (overCap) parts.push({ part: "over-cap", text: overCap });
    }
    if (estimate.unknown.length) {
      parts.push({ part: "unknown", text: "Unknown because:", items: estimate.unknown });
    }
    if (estimate.notes.length) {
      parts.push({ part: "notes", text: "Notes:", items: estimate.notes });
    }
    const untrained = describeUntrained(estimate);
    if (untrained) parts.push({ part: "untrained", text: untrained });
    return parts;
  }

  function showEstimateParts(target, estimate) {
    const list = document.createElement("ul");
    list.className = "estimate-parts";
    for (const { part, text, items } of estimateParts(estimate)) {
      const entry = document.createElement("li");
      entry.dataset.part = part;
      entry.textContent = text;
      if (items && items.length) {
        const sublist = document.createElement("ul");
        for (const item of items) {
          const subentry = document.createElement("li");
          subentry.textContent = item;
          sublist.append(subentry);
        }
        entry.append(sublist);
      }
      list.append(entry);
    }
    const heading = document.createElement("span");
    heading.textContent = "Estimate";
    heading.className = "estimate-heading";
    target.replaceChildren(heading, list);
  }

  // The server rejects a run whose known predicted price is over its cap
  // (409 price_cap_exceeded), so the estimate marks that before Run is pressed.
  function describeOverCap(estimate) {
    const text = $("max-price").value.trim();
    if (!/^\d+$/.test(text) || Number(text) === 0) return "";
    const price = estimate.price.amount_microcredits;
    if (price <= Number(text)) return "";
    return `Over the price cap of ${text} µcr, so the run would be rejected: `
      + `raise the cap to at least ${price} µcr, or clear it.`;
  }

  // Responses may arrive out of order, so only the latest request's estimate shows.
  let estimateSeq = 0;

  async function showEstimate() {
    const target = $("estimate");
    const seq = ++estimateSeq;
    try {
      const inputs = readParameters();
      const response = await fetch(`/api/workflows/${workflowId}/estimate`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ inputs, priority: priority(), ...versionField() }),
      });
      const body = await response.json();
      if (seq !== estimateSeq) return;
      if (response.ok) showEstimateParts(target, body);
      else target.textContent = `No estimate: ${body.message || response.statusText}`;
    } catch (error) {
      if (seq === estimateSeq) target.textContent = `No estimate: ${error.message}`;
    }
  }

  if ($("run-form")) {
    $("run-form").addEventListener("submit", startRun);
    // Capture runs this before a field's own listeners, so that the file
    // size check still shows its error for a newly chosen file.
    $("run-form").addEventListener("input", clearRunError, true);
    $("run-form").addEventListener("change", clearRunError, true);
    // While typing, the estimate follows a short pause.
    let typing = null;
    for (const input of document.querySelectorAll(".param")) {
      input.addEventListener("change", showEstimate);
      input.addEventListener("input", () => {
        clearTimeout(typing);
        typing = setTimeout(showEstimate, 300);
      });
    }
    for (const fieldset of document.querySelectorAll("[data-image-input]")) {
      bindImageChoice(fieldset);
    }
    $("run-priority").addEventListener("change", showEstimate);
    $("max-price").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(showEstimate, 300);
    });
    showEstimate();
  }
  if (existingRunId) follow(existingRunId);
})();

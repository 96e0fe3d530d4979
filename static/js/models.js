// Models page: list the user's models, upload weights, delete uploads.
//
// Every change goes through the JSON API (POST /api/models/, DELETE
// /api/models/<id>) with the session cookie and the CSRF header, so the
// server checks an upload exactly as it checks one sent with a token. After a
// change the page reads GET /api/models/ again and redraws both lists from it.
//
// Stable hooks for browser tests
//   #models[data-ready="true"]     set once the lists are drawn.
//   #uploads tbody tr              one row per upload, data-model-id="<id>".
//   #upload-error, #delete-error   the API's message (.error-message) and
//                                  hint (.error-hint) of the last failure.
//   #delete-confirm                the question a Delete… button opens, with
//                                  #delete-confirm-button and #delete-cancel.
(function () {
  const $ = (id) => document.getElementById(id);
  const readJson = (id) => JSON.parse($(id).textContent);
  const maxUploadText = readJson("max-upload-text");
  // Lists with more class names than this show only their count until opened.
  const CLASS_NAMES_SHOWN = 8;
  const FIELD_INPUTS = { model_id: "upload-model-id", file: "upload-file" };

  // The CSRF token rendered with the page, not the cookie's current one.
  // Signing in again in another tab rotates the session's token, so this
  // page's requests then fail the CSRF check instead of acting on the
  // account signed in now, which may own uploads with the same ids.
  const pageCsrfToken = document.querySelector("#upload-form [name=csrfmiddlewaretoken]").value;
  const SESSION_CHANGED_HINT = "Reload the page: the session changed since it loaded "
    + "(signed out, or signed in again, maybe as another user, in another tab).";

  function apiRequest(method, url, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRFToken"] = pageCsrfToken;
    return fetch(url, { method, credentials: "same-origin", headers, body });
  }

  // Return {message, hint, field} of a failed response, from the API's error
  // body where there is one.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      // Not JSON: a proxy's error page, or a connection cut short.
    }
    const message = (body && (body.message || body.detail)) || `${response.status} ${response.statusText}`;
    let hint = (body && body.hint) || "";
    if (response.status === 401 || response.status === 403) hint = hint || SESSION_CHANGED_HINT;
    return { message, hint, field: (body && body.field) || "" };
  }

  function modelUrl(modelId) {
    return "/api/models/" + modelId.split("/").map(encodeURIComponent).join("/");
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function weightsBadge(pretrained) {
    return pretrained ? element("span", "badge pretrained", "pretrained") : element("span", "badge untrained", "untrained");
  }

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
  }

  // In UTC, as every other page of the site shows times.
  function formatTime(iso) {
    const date = new Date(iso);
    const pad = (number) => String(number).padStart(2, "0");
    return `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())} `
      + `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}`;
  }

  function classNamesCell(names) {
    const cell = element("td", "class-names");
    if (names.length === 0) {
      cell.append(element("span", "muted", "none"));
    } else if (names.length <= CLASS_NAMES_SHOWN) {
      cell.textContent = names.join(", ");
    } else {
      const details = element("details");
      details.append(element("summary", "", `${names.length} classes`), element("p", "", names.join(", ")));
      cell.append(details);
    }
    return cell;
  }

  function uploadRow(upload) {
    const row = element("tr");
    row.dataset.modelId = upload.model_id;

    const idCell = element("td", "model-id");
    idCell.append(element("code", "", upload.model_id));
    const size = element("td", "num size", formatSize(upload.size_bytes));
    size.title = `${upload.size_bytes.toLocaleString()} bytes`;
    const digest = element("td", "sha256");
    digest.append(element("code", "", upload.sha256));
    const label = element("td", "weights");
    label.append(weightsBadge(upload.pretrained));
    const created = element("td", "created");
    const time = element("time", "", formatTime(upload.created_at));
    time.dateTime = upload.created_at;
    created.append(time);

    const actions = element("td", "actions");
    const button = element("button", "secondary delete-button", "Delete…");
    button.type = "button";
    button.setAttribute("aria-label", `Delete upload ${upload.model_id}…`);
    button.addEventListener("click", () => askToDelete(upload.model_id, upload.workflows || []));
    actions.append(button);

    const cells = [idCell, element("td", "task", upload.task), classNamesCell(upload.class_names), size, digest, label, created];
    // A phone shows each cell on a line of its own, named by its column.
    const headings = [...$("uploads").tHead.rows[0].cells].map((heading) => heading.textContent);
    cells.forEach((cell, index) => {
      if (index > 0) cell.dataset.label = headings[index];
    });
    row.append(...cells, actions);
    return row;
  }

  function render(listing) {
    const body = $("uploads").tBodies[0];
    body.replaceChildren(...listing.uploads.map(uploadRow));
    if (listing.uploads.length === 0) {
      const empty = element("td", "muted", "No uploads yet.");
      empty.colSpan = 8;
      const row = element("tr", "empty");
      row.append(empty);
      body.append(row);
    }

    const directory = $("model-dir");
    directory.replaceChildren(...listing.model_dir.map((entry) => {
      const item = element("li");
      item.dataset.modelId = entry.model_id;
      item.append(element("code", "", entry.model_id), " ", weightsBadge(entry.pretrained));
      return item;
    }));
    if (listing.model_dir.length === 0) directory.append(element("li", "muted", "No .pt files in the model directory."));
    $("models").dataset.ready = "true";
  }

  // Read the lists again after a change. A failure keeps the old lists and
  // shows a line to reload the page, since the change itself went through.
  async function refresh() {
    let response;
    try {
      response = await apiRequest("GET", "/api/models/");
    } catch (error) {
      $("uploads-status").textContent = `Could not reload the list (${error.message}); reload the page.`;
      return;
    }
    if (!response.ok) {
      const failure = await readError(response);
      $("uploads-status").textContent = `Could not reload the list: ${failure.message}`;
      return;
    }
    render(await response.json());
  }

  function showError(containerId, failure) {
    const container = $(containerId);
    container.querySelector(".error-message").textContent = failure.message;
    const hint = container.querySelector(".error-hint");
    hint.textContent = failure.hint;
    hint.hidden = !failure.hint;
    container.hidden = false;
  }

  function clearError(containerId) {
    const container = $(containerId);
    container.hidden = true;
    container.querySelector(".error-message").textContent = "";
    container.querySelector(".error-hint").textContent = "";
  }

  // Mark the input the API named in the error's ``field``, and tie the
  // message to it for screen readers.
  function markField(field) {
    for (const [name, inputId] of Object.entries(FIELD_INPUTS)) {
      const input = $(inputId);
      const invalid = name === field;
      input.setAttribute("aria-invalid", invalid ? "true" : "false");
      const help = `${inputId}-help`;
      input.setAttribute("aria-describedby", invalid ? `${help} upload-error` : help);
    }
    const input = FIELD_INPUTS[field] && $(FIELD_INPUTS[field]);
    if (input) input.focus();
  }

  function setUploading(uploading, text) {
    const form = $("upload-form");
    form.setAttribute("aria-busy", uploading ? "true" : "false");
    $("upload-button").disabled = uploading;
    $("upload-progress").hidden = !uploading;
    $("upload-status").textContent = text;
  }

  // Return the error for the upload form's first empty field, or null.
  function missingUploadField(modelId, file) {
    if (modelId.trim() === "") {
      return {
        field: "model_id",
        message: "Model id is missing.",
        hint: "Enter the id your workflows will use for these weights, e.g. my-detector.",
      };
    }
    if (!file) {
      return {
        field: "file",
        message: "Weights file is missing.",
        hint: "Choose a .pt file saved by ultralytics (YOLOv8 or later).",
      };
    }
    return null;
  }

  async function upload(event) {
    event.preventDefault();
    if ($("upload-button").disabled) return;
    const modelId = $("upload-model-id").value;
    const file = $("upload-file").files[0];
    clearError("upload-error");
    markField("");
    // An empty field is reported here, in the form's words, rather than
    // after sending the whole file to get the API's message for it.
    const missing = missingUploadField(modelId, file);
    if (missing) {
      showError("upload-error", missing);
      markField(missing.field);
      return;
    }
    // Only the two fields the API reads.
    const data = new FormData();
    data.append("model_id", modelId);
    data.append("file", file);

    setUploading(true, `Uploading “${file.name}” (${formatSize(file.size)}) and checking the weights…`);
    let response;
    try {
      response = await apiRequest("POST", "/api/models/", data);
    } catch (error) {
      setUploading(false, "");
      showError("upload-error", {
        message: `The upload failed before the server responded (${error.message}).`,
        hint: `Check the connection and upload again. A file over ${maxUploadText} also ends this way on some servers.`,
      });
      return;
    }
    if (!response.ok) {
      const failure = await readError(response);
      setUploading(false, "");
      showError("upload-error", failure);
      markField(failure.field);
      // Another tab may have uploaded under this id meanwhile.
      if (response.status !== 401 && response.status !== 403) await refresh();
      return;
    }
    const created = await response.json();
    // The id and file stay in the form after an error, so the user can fix
    // one of them. After a success they are cleared for the next upload.
    $("upload-form").reset();
    const classes = created.class_names.length === 1 ? "1 class" : `${created.class_names.length} classes`;
    const weights = created.pretrained ? "pretrained" : "untrained";
    setUploading(false, `Uploaded “${created.model_id}”: ${created.task}, ${classes}, ${weights}.`);
    await refresh();
  }

  function deleteButton(modelId) {
    const row = [...$("uploads").tBodies[0].rows].find((each) => each.dataset.modelId === modelId);
    return row ? row.querySelector(".delete-button") : null;
  }

  // The upload that the open question is about, or null when none is open.
  let modelToDelete = null;

  // Ask in the page, not with window.confirm, because browsers let users
  // block a page's dialogs and an open one stops the page's scripts.
  // `workflows` lists the saved workflows whose latest version names the
  // model, from GET /api/models/. Their runs fail once the upload is gone.
  function askToDelete(modelId, workflows) {
    modelToDelete = modelId;
    const question = [
      element("strong", "", `Delete the upload “${modelId}” and its file?`),
      " Finished runs keep their record of it.",
    ];
    if (workflows.length > 0) {
      const names = workflows.map((workflow) => `“${workflow.name}” (${workflow.slug})`);
      const noun = workflows.length === 1 ? "workflow names" : "workflows name";
      question.push(
        ` ${workflows.length} ${noun} it, and ${workflows.length === 1 ? "its" : "their"} runs will fail `
        + `with model_not_found until you upload weights under this id again: ${names.join(", ")}.`,
      );
    }
    $("delete-question").replaceChildren(...question);
    $("delete-confirm-button").textContent = `Delete “${modelId}”`;
    const panel = $("delete-confirm");
    panel.hidden = false;
    panel.focus();
  }

  function closeQuestion() {
    const modelId = modelToDelete;
    modelToDelete = null;
    $("delete-confirm").hidden = true;
    return modelId;
  }

  function cancelDelete() {
    const modelId = closeQuestion();
    const button = modelId === null ? null : deleteButton(modelId);
    if (button) button.focus();
  }

  function confirmDelete() {
    const modelId = closeQuestion();
    // The row may be gone when another tab deleted the upload, and the API
    // then returns 404, which the page shows.
    if (modelId !== null) deleteUpload(modelId, deleteButton(modelId));
  }

  async function deleteUpload(modelId, button) {
    const setBusy = (busy) => {
      if (button) button.disabled = busy;
    };
    clearError("delete-error");
    $("uploads-status").textContent = "";
    setBusy(true);
    let response;
    try {
      response = await apiRequest("DELETE", modelUrl(modelId));
    } catch (error) {
      setBusy(false);
      showError("delete-error", { message: `Deleting “${modelId}” failed before the server responded (${error.message}).`, hint: "" });
      return;
    }
    if (!response.ok) {
      const failure = await readError(response);
      setBusy(false);
      showError("delete-error", failure);
      // 404: it is gone already, deleted from another tab or with the API.
      if (response.status === 404) await refresh();
      return;
    }
    $("uploads-status").textContent = `Deleted “${modelId}”.`;
    await refresh();
  }

  $("upload-form").addEventListener("submit", upload);
  $("delete-confirm-button").addEventListener("click", confirmDelete);
  $("delete-cancel").addEventListener("click", cancelDelete);
  $("delete-confirm").addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancelDelete();
  });
  render(readJson("model-listing"));
})();

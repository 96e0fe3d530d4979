// Workflow list: Cancel and Escape close the delete question and return
// focus to the Delete button that opened it.
//
// The question is rendered by the server (?delete=<id>), and its Cancel
// link loads the list without the parameter. With this script, cancelling
// removes the question in place instead, so that focus can stay on the
// page, and replaces the URL with the link's.
(function () {
  const panel = document.getElementById("delete-confirm");
  if (!panel) return;
  const cancelLink = document.getElementById("delete-cancel");

  function cancelDelete() {
    const row = document.querySelector(
      `tr[data-workflow-id="${panel.dataset.workflowId}"]`,
    );
    const button = row ? row.querySelector(".delete-button") : null;
    if (!button) {
      window.location.assign(cancelLink.href);
      return;
    }
    panel.remove();
    window.history.replaceState(null, "", cancelLink.href);
    button.focus();
  }

  cancelLink.addEventListener("click", (event) => {
    event.preventDefault();
    cancelDelete();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (!panel.isConnected) return;
    event.preventDefault();
    cancelDelete();
  });
})();

// API tokens page: Cancel and Escape close the revoke question and return
// focus to the Revoke button that opened it.
//
// The question is rendered by the server (?revoke=<id>), and its Cancel
// link loads the page without the parameter. With this script, cancelling
// removes the question in place instead, so that focus can stay on the
// page, and replaces the URL with the link's.
(function () {
  const panel = document.getElementById("revoke-confirm");
  if (!panel) return;
  const cancelLink = document.getElementById("revoke-cancel");

  function cancelRevoke() {
    const row = document.querySelector(
      `tr[data-token-id="${panel.dataset.tokenId}"]`,
    );
    const button = row ? row.querySelector(".revoke-button") : null;
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
    cancelRevoke();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (!panel.isConnected) return;
    event.preventDefault();
    cancelRevoke();
  });
})();

// Closes a confirmation question that the server rendered, such as the
// workflow list's ?delete=<id> or the tokens page's ?revoke=<id>, on Cancel
// or Escape, and returns focus to the button that opened it.
//
// The panel names that button with a CSS selector in
// data-question-opener, and its Cancel link (data-question-cancel) loads
// the page without the parameter. With this script, cancelling removes
// the question in place instead, so that focus can stay on the page, and
// replaces the URL with the link's.
(function () {
  const panel = document.querySelector("[data-question-opener]");
  if (!panel) return;
  const cancelLink = panel.querySelector("[data-question-cancel]");

  function cancelQuestion() {
    const button = document.querySelector(panel.dataset.questionOpener);
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
    cancelQuestion();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (!panel.isConnected) return;
    event.preventDefault();
    cancelQuestion();
  });
})();

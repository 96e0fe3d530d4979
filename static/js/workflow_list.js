// Workflow list: Escape cancels the delete question, as its Cancel link does.
//
// The question is rendered by the server (?delete=<id>), so cancelling it
// loads the list without the parameter.
(function () {
  const panel = document.getElementById("delete-confirm");
  if (!panel) return;
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    event.preventDefault();
    window.location.assign(document.getElementById("delete-cancel").href);
  });
})();

// Timing phases in the order a run goes through them, with one colour each.
// Every page reads colours from here so a phase looks the same everywhere.
(function () {
  const names = [
    ["request", "request"], ["queue", "queue"], ["compile", "compile"],
    ["cold_load", "cold load"], ["preprocess", "preprocess"],
    ["inference", "inference"], ["postprocess", "postprocess"],
    ["blocks", "blocks"], ["serialization", "serialization"],
    ["overhead", "overhead"], ["handoff", "hand-off"],
  ];
  const style = getComputedStyle(document.documentElement);
  window.GLASSBOX_PHASES = names.map(([key, label]) => ({
    key, label, color: style.getPropertyValue(`--phase-${key}`).trim(),
  }));
  window.glassboxPhaseColor = (key) =>
    (window.GLASSBOX_PHASES.find((p) => p.key === key) || { color: "#999" }).color;
  // Microseconds to a millisecond string with three decimals.
  window.formatMs = (us) => `${(us / 1000).toFixed(3)} ms`;
  window.formatCredits = (micro) => `${micro} µcr (${(micro / 1e6).toFixed(6)} credits)`;
})();

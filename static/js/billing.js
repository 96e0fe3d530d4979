// Charts of the billing history page, drawn with Chart.js 4 from the
// server's aggregation (json_script "billing-summary", the same data as
// /billing/summary.json). Times in the data are microseconds.
(function () {
  const source = document.getElementById("billing-summary");
  if (!source || !window.Chart) return;
  const summary = JSON.parse(source.textContent);
  const style = getComputedStyle(document.documentElement);
  const cssColor = (name) => style.getPropertyValue(name).trim();
  const phase = window.glassboxPhaseColor;
  const toMs = (us) => us / 1000;
  const number = new Intl.NumberFormat("en-US");
  // Axis labels longer than this are cut with an ellipsis; tooltips show
  // the whole workflow name.
  const LABEL_MAX_CHARS = 28;
  const shorten = (text) => (text.length > LABEL_MAX_CHARS
    ? `${text.slice(0, LABEL_MAX_CHARS - 1)}…` : text);

  // Width of the latency chart's y axis and average width of a tick label's
  // character (Chart.js's default 12 px font), both estimates in pixels, and
  // the minimum width and maximum count of a wrapped label's lines.
  const Y_AXIS_PX = 60;
  const CHAR_PX = 7;
  const MIN_LINE_CHARS = 8;
  const MAX_LABEL_LINES = 3;

  // Break text at spaces into lines of at most lineChars characters, with a
  // longer word cut, and an ellipsis after MAX_LABEL_LINES lines. Returns
  // the text itself when it fits on one line, else the list of lines, which
  // Chart.js draws one under another.
  function wrapLabel(text, lineChars) {
    if (text.length <= lineChars) return text;
    const lines = [];
    let line = "";
    for (const word of text.split(" ")) {
      for (let start = 0; start < word.length; start += lineChars) {
        const piece = word.slice(start, start + lineChars);
        const joined = line && start === 0 ? `${line} ${piece}` : piece;
        if (line && (start > 0 || joined.length > lineChars)) {
          lines.push(line);
          line = piece;
        } else {
          line = joined;
        }
      }
    }
    if (line) lines.push(line);
    if (lines.length <= MAX_LABEL_LINES) return lines;
    const shown = lines.slice(0, MAX_LABEL_LINES);
    const last = shown[MAX_LABEL_LINES - 1];
    if (!last.endsWith("…")) shown[MAX_LABEL_LINES - 1] = `${last.slice(0, lineChars - 1)}…`;
    return shown;
  }

  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.color = cssColor("--muted");
  Chart.defaults.plugins.legend.labels.boxWidth = 12;

  drawDaily(summary.days);
  drawBilledTime(summary.days);
  // The page draws no latency canvas when no run succeeded.
  if (summary.latency.length) drawLatency(summary.latency);
  drawStarts(summary.starts);

  function drawDaily(days) {
    new Chart(document.getElementById("chart-daily"), {
      data: {
        labels: days.labels,
        datasets: [
          {
            type: "bar", label: "Amount (µcr)", data: days.amount_microcredits,
            backgroundColor: cssColor("--accent"), yAxisID: "amount", order: 2,
            maxBarThickness: 40,
          },
          {
            type: "line", label: "Runs", data: days.runs, yAxisID: "runs",
            borderColor: cssColor("--ink"), backgroundColor: cssColor("--ink"),
            pointRadius: 2, borderWidth: 1.5, tension: 0.2, order: 1,
          },
        ],
      },
      options: {
        interaction: { mode: "index", intersect: false },
        scales: {
          amount: {
            position: "left", beginAtZero: true,
            title: { display: true, text: "µcr" },
          },
          runs: {
            position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
            ticks: { precision: 0 }, title: { display: true, text: "runs" },
          },
        },
      },
    });
  }

  function drawBilledTime(days) {
    const parts = [
      ["cold_load_us", "Cold load", phase("cold_load")],
      // The card's note names the phases these are, since a legend entry
      // that long does not fit a phone's width.
      ["model_steps_us", "Model steps", phase("inference")],
      ["other_us", "Other runner time", phase("overhead")],
      ["rounding_us", "Minimum and rounding", phase("handoff")],
    ];
    new Chart(document.getElementById("chart-billed-time"), {
      type: "bar",
      data: {
        labels: days.labels,
        datasets: parts.map(([key, label, color]) => ({
          label, data: days[key].map(toMs), backgroundColor: color, maxBarThickness: 40,
        })),
      },
      options: {
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: true },
          y: { stacked: true, beginAtZero: true, title: { display: true, text: "ms" } },
        },
        plugins: {
          tooltip: {
            callbacks: {
              label: (item) => `${item.dataset.label}: ${formatMs(days[parts[item.datasetIndex][0]][item.dataIndex])}`,
              footer: (items) => {
                const index = items[0].dataIndex;
                const total = parts.reduce((sum, [key]) => sum + days[key][index], 0);
                return `Billed: ${formatMs(total)}`;
              },
            },
          },
        },
      },
    });
  }

  function drawLatency(latency) {
    const percentiles = [
      ["p50_us", "p50", "#93c5fd"],
      ["p90_us", "p90", "#3b82f6"],
      ["p99_us", "p99", "#1e3a8a"],
    ];
    const canvas = document.getElementById("chart-latency");
    // Labels lie flat, wrapped to the width of their group of bars, because
    // rotated ones took most of the height on a phone and left the bars a third.
    const groupWidth = (canvas.parentElement.clientWidth - Y_AXIS_PX) / latency.length;
    const lineChars = Math.max(MIN_LINE_CHARS, Math.floor(groupWidth / CHAR_PX));
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: latency.map((entry) => wrapLabel(
          `${shorten(entry.workflow)} (${entry.runs})`, lineChars)),
        datasets: percentiles.map(([key, label, color]) => ({
          label, data: latency.map((entry) => toMs(entry[key])), backgroundColor: color,
          maxBarThickness: 40,
        })),
      },
      options: {
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { ticks: { maxRotation: 0, autoSkip: false } },
          y: { beginAtZero: true, title: { display: true, text: "ms" } },
        },
        plugins: {
          tooltip: {
            callbacks: {
              title: (items) => `${latency[items[0].dataIndex].workflow} (${latency[items[0].dataIndex].runs} runs)`,
              label: (item) => `${item.dataset.label}: ${formatMs(latency[item.dataIndex][percentiles[item.datasetIndex][0]])}`,
            },
          },
        },
      },
    });
  }

  function drawStarts(starts) {
    // Runs that loaded and called no model, runs whose model failed to
    // load, and runs that ended before a runner timed them get slices of
    // their own, shown only when there are any.
    const kinds = [
      ["hot", "Hot", cssColor("--ok")],
      ["cold", "Cold", phase("cold_load")],
      ["no_model", "No model", phase("handoff")],
      ["load_failed", "Load failed", cssColor("--danger")],
      ["no_timing", "Not timed", phase("request")],
    ].filter(([key]) => ["hot", "cold"].includes(key) || starts[key].runs > 0);
    const runs = kinds.reduce((sum, [key]) => sum + starts[key].runs, 0);
    new Chart(document.getElementById("chart-starts"), {
      type: "doughnut",
      data: {
        labels: kinds.map(([key, label]) => `${label}: ${number.format(starts[key].runs)}`),
        datasets: [{
          data: kinds.map(([key]) => starts[key].runs),
          backgroundColor: kinds.map(([, , color]) => color),
        }],
      },
      options: {
        plugins: {
          legend: { position: "right" },
          tooltip: {
            callbacks: {
              label: (item) => {
                const entry = starts[kinds[item.dataIndex][0]];
                const share = runs ? (100 * entry.runs / runs).toFixed(1) : "0.0";
                return `${number.format(entry.runs)} runs (${share} %), ${number.format(entry.amount_microcredits)} µcr`;
              },
            },
          },
        },
      },
    });
  }
})();

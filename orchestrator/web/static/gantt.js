// The run's timeline (a Gantt chart) from its events: one row per step, one bar per attempt — its wait in the queue
// (lighter), then its run coloured by outcome — with rate-limit deferrals and approval waits drawn apart, retries as
// bars of their own and the critical path (the chain of steps that decided when the run ended) highlighted.
import { statusClass } from "./common.js";
import { svg } from "./dag.js";

const ROW = 24;
const BAR = 14;
const LABEL = 160;
const FACTS = 190;
const AXIS = 24;
const MIN_BAR = 2;
const TICKS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
const OUTCOME_STATUS = {
  retry: "failed", deferred: "queued", lost: "upstream_failed", waiting: "waiting", open: "running",
};
const RUN_END = { run_cancelled: "cancelled", run_timed_out: "timed_out" };

// The timeline: {start, end, rows: Map step → {bars, marks, open}} from events ({type, step, attempt, ts (ms),
// data}) in seq order. A bar is {kind: queue | deferred | run | wait, from, to, attempt, outcome}; `open` is the bar
// still going on (to be drawn up to now); marks are instants (skipped, upstream failed).
export function timelineOf(events, names) {
  const rows = new Map(names.map((name) => [name, { bars: [], marks: [], open: null }]));
  let start = null;
  let end = null;
  const close = (row, ts, outcome, attempt) => {
    if (!row.open) return;
    row.bars.push({ ...row.open, to: ts, outcome, attempt: row.open.attempt ?? attempt ?? null });
    row.open = null;
  };
  for (const { type, step, attempt, ts, data } of events) {
    if (!Number.isFinite(ts)) continue;
    start = start === null ? ts : Math.min(start, ts);
    end = end === null ? ts : Math.max(end, ts);
    const row = step ? rows.get(step) : null;
    if (!row) {
      if (RUN_END[type]) for (const other of rows.values()) close(other, ts, RUN_END[type]);
      continue;
    }
    if (type === "step_queued") {
      if (row.open?.kind !== "queue") close(row, ts, "lost");
      row.open ||= { kind: "queue", from: ts };
    } else if (type === "step_started") {
      close(row, ts, "started", attempt);
      row.open = { kind: "run", from: ts, attempt };
    } else if (type === "step_retry") {
      close(row, ts, "retry");
      row.open = { kind: "queue", from: ts };
    } else if (type === "step_deferred") {
      close(row, ts, "deferred");
      row.open = { kind: "deferred", from: ts, reason: data?.deferral?.reason };
    } else if (type === "step_lost") {
      close(row, ts, "lost");
    } else if (type === "step_waiting") {
      close(row, ts, "waiting");
      row.open = { kind: "wait", from: ts, attempt: row.bars.at(-1)?.attempt };
    } else if (type.startsWith("step_")) {
      const outcome = type.slice("step_".length);
      close(row, ts, outcome);
      if (outcome === "skipped" || outcome === "upstream_failed") row.marks.push({ at: ts, outcome });
    }
  }
  return { start, end, rows };
}

// When each step stopped (its last bar's end, `now` for one going on), or nothing if it never did anything.
function endsOf(timeline, now) {
  const ends = new Map();
  for (const [name, row] of timeline.rows) {
    const last = row.open ? now : Math.max(...row.bars.map((b) => b.to), ...row.marks.map((m) => m.at));
    if (Number.isFinite(last)) ends.set(name, last);
  }
  return ends;
}

// The critical path: from the step that ended last, back through the dependency that ended last (the one that let
// it start), to a root. Returns the set of its steps.
export function criticalPath(timeline, steps, now) {
  const ends = endsOf(timeline, now);
  const path = new Set();
  const latest = (names) => names.filter((n) => ends.has(n)).sort((a, b) => ends.get(b) - ends.get(a))[0];
  let current = latest([...ends.keys()]);
  while (current && !path.has(current)) {
    path.add(current);
    current = latest(steps[current]?.depends_on || []);
  }
  return path;
}

function tickStep(spanS) {
  return TICKS.find((step) => spanS / step <= 8) || TICKS[TICKS.length - 1];
}

function tickLabel(seconds) {
  if (seconds < 60) return `${Number(seconds.toFixed(1))} s`;
  if (seconds < 3600) return `${Number((seconds / 60).toFixed(1))} min`;
  return `${Number((seconds / 3600).toFixed(1))} h`;
}

function describe(name, bar, to) {
  const seconds = ((to - bar.from) / 1000).toFixed(1);
  const what = {
    queue: "queued", deferred: `deferred (${bar.reason || "rate limit"})`, wait: "waiting for approval", run: "ran",
  }[bar.kind];
  const attempt = bar.attempt ? ` attempt ${bar.attempt}` : "";
  return `${name}${attempt}: ${what} ${seconds} s${bar.outcome ? ` → ${bar.outcome.replace("_", " ")}` : ""}`;
}

function barClass(bar) {
  if (bar.kind === "queue") return "gantt-bar gantt-queue";
  if (bar.kind === "deferred") return "gantt-bar gantt-deferred";
  if (bar.kind === "wait") return `gantt-bar gantt-wait ${statusClass("waiting")}`;
  const status = OUTCOME_STATUS[bar.outcome] || bar.outcome;
  return `gantt-bar gantt-run ${statusClass(status)}${bar.outcome === "retry" ? " retried" : ""}`;
}

// Draws the timeline into the <svg> element, `width` pixels wide. factsOf(name) is the text at the row's right
// (duration, cost); onSelect(name) runs when a row's label is clicked; `critical` is the set of steps to highlight.
export function drawTimeline(root, { timeline, names, now, width, critical, factsOf, onSelect }) {
  root.replaceChildren();
  const height = AXIS + names.length * ROW + 4;
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  if (timeline.start === null) return;
  const end = Math.max(timeline.end, [...timeline.rows.values()].some((r) => r.open) ? now : timeline.end);
  const span = Math.max(end - timeline.start, 1000);
  const chart = Math.max(100, width - LABEL - FACTS);
  const x = (ts) => LABEL + ((ts - timeline.start) / span) * chart;

  const axis = svg("g", { class: "gantt-axis" });
  const step = tickStep(span / 1000);
  for (let s = 0; s * 1000 <= span; s += step) {
    axis.append(svg("line", { x1: x(timeline.start + s * 1000), x2: x(timeline.start + s * 1000), y1: AXIS - 6,
      y2: height }), svg("text", { x: x(timeline.start + s * 1000), y: AXIS - 10, "text-anchor": "middle" },
      tickLabel(s)));
  }
  root.append(axis);

  names.forEach((name, index) => {
    const row = timeline.rows.get(name);
    const top = AXIS + index * ROW;
    const g = svg("g", { class: `gantt-row${critical.has(name) ? " critical" : ""}`, "data-name": name });
    g.append(svg("rect", { class: "gantt-band", x: 0, y: top, width, height: ROW }));
    const label = svg("text", { class: "gantt-label", x: 6, y: top + ROW / 2 + 4 }, name);
    label.addEventListener("click", () => onSelect(name));
    g.append(label, svg("text", { class: "gantt-facts", x: width - 6, y: top + ROW / 2 + 4, "text-anchor": "end" },
      factsOf(name)));
    const bars = row.open ? [...row.bars, { ...row.open, to: now, outcome: row.open.kind === "run" ? "open" : null }]
      : row.bars;
    for (const bar of bars) {
      const left = x(bar.from);
      const rect = svg("rect", { class: barClass(bar), x: left, y: top + (ROW - BAR) / 2, height: BAR, rx: 2,
        width: Math.max(MIN_BAR, x(bar.to) - left), "data-name": name, "data-kind": bar.kind,
        "data-attempt": bar.attempt ?? "", "data-outcome": bar.outcome ?? "" });
      rect.append(svg("title", {}, describe(name, bar, bar.to)));
      g.append(rect);
    }
    for (const mark of row.marks) {
      const at = x(mark.at);
      g.append(svg("path", { class: `gantt-mark ${statusClass(mark.outcome)}`, "data-outcome": mark.outcome,
        d: `M ${at} ${top + 5} l 5 7 l -5 7 l -5 -7 z` }));
    }
    root.append(g);
  });
}

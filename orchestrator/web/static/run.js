// One run: its DAG coloured live from the SSE stream, its timeline of attempts, cost, tokens and budget, a step's
// details on click, cancel and resume, and the approve / reject form of an approval step that waits for a human (an
// approval map step: a row per waiting item, each with its own buttons).
import {
  FINISHED_RUN, FINISHED_STEP, api, el, formatDuration, formatTime, messageOf, setupTokenForm, showMessage,
  statusClass, token,
} from "./common.js";
import { conversationOf, renderConversation } from "./conversation.js";
import { drawDag } from "./dag.js";
import { criticalPath, drawTimeline, timelineOf } from "./gantt.js";
import { renderProgress, renderRunFacts, stepFacts, stepMoneyFacts } from "./summary.js";

const STEP_EVENTS = {
  step_queued: "queued", step_started: "running", step_retry: "queued", step_deferred: "queued", step_lost: "queued",
  step_succeeded: "succeeded", step_failed: "failed", step_skipped: "skipped",
  step_upstream_failed: "upstream_failed", step_cancelled: "cancelled", step_waiting: "waiting",
};
const RUN_EVENTS = {
  run_started: "running", run_resumed: "running", run_succeeded: "succeeded", run_failed: "failed",
  run_cancelled: "cancelled", run_timed_out: "timed_out",
};
const POLL_MS = 2000;
const IDLE_POLL_MS = 15000;
const RELOAD_DEBOUNCE_MS = 250;
const TICK_MS = 1000; // durations and the timeline's running bars grow while the run goes on

const runId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const $ = (id) => document.getElementById(id);

// What the page shows: the last status JSON, overlaid with the events that arrived since.
let view = null;
let dag = null;
let selected = null;
let seenSeq = 0; // the highest event seq applied
const stepSeq = new Map(); // step → seq of the last event applied to it
let runSeq = 0;
let source = null;
let pollTimer = null;
let reloadTimer = null;
// A map step's item events that end an item, and the counter each moves it to.
const ITEM_ENDS = { item_succeeded: "succeeded", item_failed: "failed" };
const AGENT_EVENTS = ["agent_turn", "tool_call"];
const waits = new Map(); // step → data of its last step_waiting event: {approvers, message, timeout_s}
const itemWaits = new Map(); // "step#index" → data of the item's last item_waiting event: {index, approvers, message}
const ITEM_PAGE = 1000; // item records per request (the API's most)
const MAX_ITEM_PAGES = 10; // a map step has 10,000 items at most (ORCH_MAP_MAX_ITEMS)
let waitingItems = { step: null, records: [] }; // the selected approval map step's items waiting for a decision
let deciding = false;
const events = []; // every event applied, in seq order: {type, step, attempt, ts (ms), data}, for the timeline
// A streaming step's text so far (since its last llm_reset), by step; every (re)connect starts with the text so far.
const streamed = new Map();
let timelineFrame = 0;

function endpoint(suffix = "") {
  return `/runs/${encodeURIComponent(runId)}${suffix}`;
}

// Applies a status JSON fetched when events up to `asOf` had been applied: an event newer than that wins over it.
function applySnapshot(snapshot, asOf) {
  const old = view;
  view = snapshot;
  for (const [name, step] of Object.entries(snapshot.steps)) {
    if ((stepSeq.get(name) || 0) > asOf && old?.steps[name]) {
      step.status = old.steps[name].status;
      step.attempts = old.steps[name].attempts;
    }
  }
  if (runSeq > asOf && old) snapshot.status = old.status;
  if (!dag) dag = drawDag($("dag"), snapshot.steps, select);
  render();
}

let loadFailed = false;
// Reloads overlap (the first load, the stream's events, polling) and their answers may come back in any order: one
// asked for before the last applied is older than it, and is dropped.
let reloadsAsked = 0;
let reloadApplied = 0;

async function reload() {
  const asOf = seenSeq;
  const asked = ++reloadsAsked;
  try {
    const snapshot = await api(endpoint());
    const name = selected;
    if (isItemApproval(snapshot.steps[name])) waitingItems = { step: name, records: await waitingRecords(name) };
    if (asked < reloadApplied) return;
    reloadApplied = asked;
    applySnapshot(snapshot, asOf);
    if (loadFailed) showMessage($("message"), "");
    loadFailed = false;
  } catch (error) {
    showMessage($("message"), `Cannot load run ${runId}: ${error.message}`, "error");
    loadFailed = true;
  }
}

// An approval step with for_each: one decision per item.
function isItemApproval(step) {
  return step?.kind === "approval" && Boolean(step.items);
}

// The item records of map step `name` that wait for a decision, a page at a time.
async function waitingRecords(name) {
  const records = [];
  for (let page = 0; page < MAX_ITEM_PAGES; page += 1) {
    const offset = page * ITEM_PAGE;
    const answer = await api(endpoint(`/steps/${encodeURIComponent(name)}/items?offset=${offset}&limit=${ITEM_PAGE}`));
    records.push(...(answer.items || []).filter((record) => record.status === "waiting"));
    if (offset + ITEM_PAGE >= (answer.total ?? 0)) break;
  }
  return records;
}

function scheduleReload() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(reload, RELOAD_DEBOUNCE_MS);
}

function onEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  const seq = Number(message.lastEventId || event.seq || 0);
  if (seq && seq <= seenSeq) return; // a reconnect never repeats, but stay safe
  seenSeq = Math.max(seenSeq, seq);
  const type = event.type || message.type;
  events.push({ type, step: event.step, attempt: event.attempt, ts: Date.parse(event.ts), data: event.data || {} });
  if (type === "step_waiting" && event.step) waits.set(event.step, event.data || {});
  if (type === "item_waiting" && event.step) itemWaits.set(`${event.step}#${event.data?.index}`, event.data || {});
  if (type === "agent_turn" && event.step) streamed.delete(event.step); // the turn's text is in its event now
  if (!view) return scheduleReload();
  const items = event.step && view.steps[event.step]?.items;
  // The selected approval map step's list of waiting items changes with its items' events.
  if (event.step === selected && type.startsWith("item_") && isItemApproval(view.steps[selected])) scheduleReload();
  if (items && ITEM_ENDS[type]) {
    // A map step's item ended: move it between the counters until the next snapshot brings them.
    items[ITEM_ENDS[type]] += 1;
    items.running = Math.max(0, items.running - 1);
  } else if (event.step && type === "item_started" && view.steps[event.step] && !items) {
    scheduleReload(); // the first item: fetch the step's counters
  }
  if (event.step && STEP_EVENTS[type] && view.steps[event.step]) {
    const step = view.steps[event.step];
    step.status = STEP_EVENTS[type];
    if (event.attempt) step.attempts = event.attempt;
    applyFigures(step, type, event);
    stepSeq.set(event.step, seq);
    if (FINISHED_STEP.has(step.status) || step.status === "waiting") scheduleReload(); // fetch output and error
  } else if (RUN_EVENTS[type]) {
    view.status = RUN_EVENTS[type];
    runSeq = seq;
    scheduleReload(); // a resume resets steps without an event each; an end brings the run's error
  }
  render();
}

// llm_delta / llm_reset: a streaming step's text grows live in its panel (they have no seq: never counted as seen).
function onDelta(message) {
  let delta;
  try {
    delta = JSON.parse(message.data);
  } catch {
    return;
  }
  const name = delta.step;
  streamed.set(name, message.type === "llm_reset" ? "" : (streamed.get(name) || "") + (delta.text || ""));
  if (name === selected && view?.steps[name]) renderStreamed(view.steps[name]);
}

// The panel shows the step's output once it has one, else what it has streamed so far; an agent's streamed text
// is the turn it is writing, shown at the end of its conversation.
function renderStreamed(step) {
  const agent = step.kind === "agent";
  const live = !agent && (step.output === null || step.output === undefined) && streamed.has(selected);
  $("panel-output").textContent = live ? streamed.get(selected) : pretty(step.output);
  $("panel-output").classList.toggle("streaming", live);
  $("conversation").hidden = !agent;
  if (!agent) return;
  const writing = FINISHED_STEP.has(step.status) ? "" : streamed.get(selected) || "";
  renderConversation($("conversation-turns"), conversationOf(events, selected), writing);
}

// What an event tells about a step's times, tokens and cost before the next snapshot brings them.
function applyFigures(step, type, event) {
  if (type === "step_started") {
    step.started_at ||= event.ts;
    step.finished_at = null;
  } else if (FINISHED_STEP.has(STEP_EVENTS[type])) {
    step.finished_at = event.ts;
  }
  const data = event.data || {};
  if (type === "step_succeeded" && data.usage) step.usage = data.usage;
  if (type === "step_succeeded" && typeof data.cost_usd === "number") step.cost = data.cost_usd;
}

function openStream() {
  source?.close();
  clearTimeout(pollTimer);
  // EventSource cannot send headers: the token goes in the query string. It resends Last-Event-ID on reconnects.
  const query = token() ? `?token=${encodeURIComponent(token())}` : "";
  source = new EventSource(endpoint(`/events${query}`));
  const types = [
    ...Object.keys(STEP_EVENTS), ...Object.keys(RUN_EVENTS), ...Object.keys(ITEM_ENDS), "item_started", "item_waiting",
    ...AGENT_EVENTS,
  ];
  for (const type of types) {
    source.addEventListener(type, onEvent);
  }
  source.addEventListener("message", onEvent);
  source.addEventListener("llm_delta", onDelta);
  source.addEventListener("llm_reset", onDelta);
  source.addEventListener("open", () => streamed.clear()); // the server sends the text so far first
  source.addEventListener("open", renderLive);
  source.addEventListener("error", () => {
    // Refused, or told not to come back (HTTP 204 once the run ended): keep the page current by polling.
    if (source.readyState === EventSource.CLOSED) poll();
    renderLive();
  });
}

// Without a stream: often while the run goes on, rarely once it ended (someone may resume it elsewhere).
async function poll() {
  await reload();
  if (source?.readyState !== EventSource.CLOSED) return; // the stream was reopened meanwhile
  pollTimer = setTimeout(poll, view && FINISHED_RUN.has(view.status) ? IDLE_POLL_MS : POLL_MS);
}

// The stream's state; an ended run's stream closing (and the browser's retries) is nothing to report.
function renderLive() {
  const ended = view && FINISHED_RUN.has(view.status);
  let text = "";
  if (source?.readyState === EventSource.OPEN) text = "live";
  else if (!ended) text = source?.readyState === EventSource.CLOSED ? "polling" : "reconnecting…";
  $("live").textContent = text ? `● ${text}` : "";
  $("live").className = text === "live" ? "live" : "muted";
}

// The run's status as the API computes it, kept current between snapshots: a live run "waits" when only steps
// waiting for a human decision are under way.
function runStatus() {
  if (view.status !== "running" && view.status !== "waiting") return view.status;
  const live = new Set(Object.values(view.steps).map((s) => s.status));
  return live.has("waiting") && !live.has("queued") && !live.has("running") ? "waiting" : "running";
}

function render() {
  if (!view) return;
  renderFigures();
  $("workflow").textContent = `${view.workflow} v${view.version}`;
  const status = runStatus();
  $("run-status").textContent = status.replace("_", " ");
  $("run-status").className = `badge ${statusClass(status)}`;
  renderProgress($("progress"), $("progress-text"), Object.values(view.steps));
  const error = view.status === "failed" || view.status === "timed_out" ? messageOf(view.error) || view.error : "";
  $("run-error").textContent = typeof error === "string" ? error : JSON.stringify(error);
  $("run-error").hidden = !error;
  const finished = FINISHED_RUN.has(view.status);
  $("cancel").disabled = finished;
  $("resume").disabled = !finished || view.status === "succeeded";
  $("resume-from").hidden = !selected;
  $("resume-from").disabled = !finished;
  $("resume-from").textContent = `Resume from ${selected}`;
  renderLive();
  renderPanel();
}

function scheduleTimeline() {
  if (!timelineFrame) timelineFrame = requestAnimationFrame(renderTimeline);
}

// The timeline, rebuilt from every event at most once a frame; the critical path is marked on the DAG too.
function renderTimeline() {
  timelineFrame = 0;
  if (!view) return;
  const names = Object.keys(view.steps);
  const timeline = timelineOf(events, names);
  const now = Date.now();
  const critical = criticalPath(timeline, view.steps, now);
  const wrap = $("gantt").parentElement;
  drawTimeline($("gantt"), {
    timeline, names, now, critical, width: Math.max(600, wrap.clientWidth - 18),
    factsOf: (name) => stepFacts(view.steps[name]), onSelect: select,
  });
  $("gantt-empty").hidden = timeline.start !== null;
  dag.mark(critical);
}

// What changes with time: the run's cost, tokens, budget left and duration, each step's box, the timeline.
function renderFigures() {
  renderRunFacts({ cost: $("run-cost"), tokens: $("run-tokens"), budget: $("budget-left"), duration: $("duration") },
    view);
  for (const [name, step] of Object.entries(view.steps)) dag.update(name, step.status, step.attempts, stepFacts(step));
  scheduleTimeline();
}

window.addEventListener("resize", () => view && scheduleTimeline());

// While the run goes on, its durations and running bars grow.
setInterval(() => {
  if (view && !FINISHED_RUN.has(view.status)) renderFigures();
}, TICK_MS);

function pretty(value) {
  if (value === null || value === undefined) return "—";
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function renderPanel() {
  const step = selected && view.steps[selected];
  $("panel").hidden = !step;
  if (!step) return;
  $("panel-title").textContent = selected;
  const facts = [
    ["Status", el("span", { class: `badge ${statusClass(step.status)}` }, step.status.replace("_", " "))],
    ["Kind", step.kind || "—"],
    ["Attempts", String(step.attempts ?? 0)],
    ["Depends on", (step.depends_on || []).join(", ") || "—"],
    ["Started", formatTime(step.started_at)],
    ["Finished", formatTime(step.finished_at)],
    ["Duration", step.started_at ? formatDuration(step.started_at, step.finished_at) : "—"],
  ];
  facts.push(...stepMoneyFacts(step));
  if (step.cached) facts.push(["Cached", "yes (result reused)"]);
  $("panel-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  renderStreamed(step);
  const errors = step.error ? [step.error] : step.errors || [];
  $("panel-error").textContent = errors.length ? errors.map(pretty).join("\n\n") : "—";
  $("panel-error").classList.toggle("has-error", Boolean(step.error));
  renderApproval(step);
}

// An approval step: what the approvers are asked, the decision form while it waits, and every decision attempt; an
// approval map step: its waiting items, each with what it asks and its own buttons (each item keeps its own audit).
function renderApproval(step) {
  const approval = step.kind === "approval" ? step.approval || {} : null;
  $("approval").hidden = !approval;
  if (!approval) return;
  const perItem = isItemApproval(step);
  const asked = perItem ? { ...firstItemWait(step) } : { ...approval, ...waits.get(selected) };
  $("approval-message").textContent = perItem ? "" : asked.message || "";
  $("approval-message").hidden = perItem || !asked.message;
  const facts = [["Approvers", [].concat(asked.approvers ?? []).join(", ") || "—"]];
  if (perItem) {
    const { total = 0, waiting = 0, succeeded = 0, failed = 0, skipped = 0, cancelled = 0 } = step.items;
    facts.push(["Items", `${waiting} waiting, ${succeeded + failed + skipped + cancelled} of ${total} decided`]);
  }
  if (approval.waiting_since) facts.push(["Waiting since", formatTime(approval.waiting_since)]);
  if (approval.decide_by) facts.push(["Decide by", formatTime(approval.decide_by)]);
  const decided = approval.decision;
  if (decided) facts.push(["Decision", `${decided.decision} by ${decided.by}, ${formatTime(decided.at)}`]);
  $("approval-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  const records = perItem && waitingItems.step === selected ? waitingItems.records : [];
  $("decision-form").hidden = perItem ? !records.length : step.status !== "waiting";
  $("decision-buttons").hidden = perItem;
  $("approve").disabled = deciding;
  $("reject").disabled = deciding;
  $("item-decisions").hidden = !perItem;
  // Rebuilt only when the list changes: a row replaced under the pointer would swallow a click.
  const rows = records.map((record) => [record.index, itemWaits.has(`${selected}#${record.index}`)]);
  const shown = JSON.stringify([selected, deciding, rows]);
  if ($("item-decisions").dataset.shown !== shown) {
    $("item-decisions").dataset.shown = shown;
    $("item-decisions").replaceChildren(...records.map((record) => itemRow(record)));
  }
  $("audit-section").hidden = perItem;
  const audit = approval.audit || [];
  $("audit-empty").hidden = audit.length > 0;
  $("audit").hidden = !audit.length;
  $("audit").replaceChildren(
    ...audit.map((entry) =>
      el("li", { class: entry.outcome === "accepted" ? "accepted" : "refused" },
        el("div", {}, el("strong", {}, entry.by ?? "?"), ` ${entry.decision ?? "?"} · ${entry.outcome ?? "?"}`),
        el("div", { class: "muted" }, formatTime(entry.at)),
        entry.comment ? el("q", {}, entry.comment) : null,
      ),
    ),
  );
}

// What the first waiting item asked (the approvers are the step's, the same for every item).
function firstItemWait(step) {
  const first = waitingItems.step === selected ? waitingItems.records[0] : undefined;
  return (first && itemWaits.get(`${selected}#${first.index}`)) || {};
}

// One waiting item: its index, its value, what it asks, and its buttons (submitting the form with its index).
function itemRow(record) {
  const message = itemWaits.get(`${selected}#${record.index}`)?.message;
  const button = (decision, label, cls) =>
    el("button", { type: "submit", value: decision, class: cls, "data-item": record.index, disabled: deciding }, label);
  return el("li", { "data-item": record.index },
    el("div", {}, el("strong", {}, `Item ${record.index}`), " ", el("code", {}, JSON.stringify(record.item))),
    message ? el("div", { class: "approval-message" }, message) : null,
    el("div", { class: "decision-buttons" },
      button("approve", "Approve", "approve"), button("reject", "Reject", "danger")),
  );
}

function select(name) {
  if (name !== selected) {
    showMessage($("decision-result"), "");
    $("decision-comment").value = "";
  }
  selected = name;
  dag.select(name);
  render();
  reload(); // the freshest output and error
}

async function control(path, body, done) {
  for (const id of ["cancel", "resume", "resume-from"]) $(id).disabled = true;
  try {
    const answer = await api(endpoint(path), { method: "POST", body });
    showMessage($("message"), messageOf(answer) || done(answer), "ok");
  } catch (error) {
    showMessage($("message"), error.message, "error");
  }
  await reload();
  if (source?.readyState === EventSource.CLOSED) openStream();
  render(); // re-enables the buttons even when the reload failed
}

$("cancel").addEventListener("click", () => {
  if (!confirm(`Cancel run ${runId}? Running steps are interrupted; finished outputs are kept.`)) return;
  control("/cancel", undefined, () => "cancel requested");
});
$("resume").addEventListener("click", () => control("/resume", {}, (a) => `resumed (generation ${a?.generation ?? "?"})`));
$("resume-from").addEventListener("click", () =>
  control("/resume", { from_step: selected }, (a) => `resumed from ${selected} (generation ${a?.generation ?? "?"})`),
);
// Decides as the principal of the token (or the API's anonymous loopback principal); shows the API's answer.
// `item`: the index of an approval map step's item, else undefined.
async function decide(decision, item) {
  const step = selected;
  deciding = true;
  render();
  try {
    const body = { decision, comment: $("decision-comment").value.trim() };
    if (item !== undefined) body.item = item;
    const answer = await api(endpoint(`/steps/${encodeURIComponent(step)}/decision`), { method: "POST", body });
    const verdict = answer?.approved ? "approved" : "rejected";
    const what = item === undefined ? step : `${step} item ${item}`;
    showMessage($("decision-result"), `${what} ${verdict} by ${answer?.by ?? "?"}`, "ok");
    $("decision-comment").value = "";
  } catch (error) {
    showMessage($("decision-result"), `Could not ${decision}: ${error.message}`, "error");
  }
  deciding = false;
  await reload(); // the decision and the audit trail
  if (source?.readyState === EventSource.CLOSED) openStream();
  render();
}

$("decision-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const decision = event.submitter?.value;
  const item = event.submitter?.dataset.item;
  if (selected && (decision === "approve" || decision === "reject")) {
    decide(decision, item === undefined ? undefined : Number(item));
  }
});
$("panel-close").addEventListener("click", () => {
  selected = null;
  dag?.select(null);
  render();
});

$("run-id").textContent = runId;
document.title = `Run ${runId} · Orchestrator`;
setupTokenForm(() => {
  reload();
  openStream();
});
reload();
openStream();

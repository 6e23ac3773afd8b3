// The runs list: GET /runs with the filters and the page in the URL's query, redrawn every few seconds.
import { api, el, formatTime, setupTokenForm, showMessage, statusBadge } from "./common.js";

const REFRESH_MS = 2000;
const PAGE_SIZE = 25;
const body = document.querySelector("#runs tbody");
const message = document.getElementById("message");
const statusFilter = document.getElementById("filter-status");
const workflowFilter = document.getElementById("filter-workflow");
const prev = document.getElementById("page-prev");
const next = document.getElementById("page-next");
let timer = null;
// The page shown: filters and offset, mirrored in the URL's query (?status=&workflow=&offset=&limit=).
const state = { status: "", workflow: "", offset: 0, limit: PAGE_SIZE, nextOffset: null };

function readQuery() {
  const query = new URLSearchParams(window.location.search);
  state.status = query.get("status") || "";
  state.workflow = query.get("workflow") || "";
  state.offset = Math.max(0, Number.parseInt(query.get("offset") || "0", 10) || 0);
  state.limit = Math.min(1000, Math.max(1, Number.parseInt(query.get("limit") || `${PAGE_SIZE}`, 10) || PAGE_SIZE));
  statusFilter.value = state.status;
  workflowFilter.value = state.workflow;
}

function query() {
  const q = new URLSearchParams();
  if (state.status) q.set("status", state.status);
  if (state.workflow) q.set("workflow", state.workflow);
  if (state.offset) q.set("offset", String(state.offset));
  if (state.limit !== PAGE_SIZE) q.set("limit", String(state.limit));
  return q;
}

function writeQuery() {
  const q = query();
  history.replaceState(null, "", `${window.location.pathname}${q.size ? `?${q}` : ""}`);
}

// GET /runs answers {"runs": [summary, ...], "next_offset"} (a bare list is accepted too).
function runsOf(answer) {
  if (Array.isArray(answer)) return answer;
  return answer && Array.isArray(answer.runs) ? answer.runs : [];
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(Number(seconds))) return "—";
  const s = Number(seconds);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function formatCost(cost) {
  return cost === null || cost === undefined ? "—" : `$${Number(cost).toFixed(4)}`;
}

function formatTokens(usage) {
  if (!usage) return "—";
  return `${usage.input_tokens ?? 0} in / ${usage.output_tokens ?? 0} out`;
}

function row(run) {
  const id = String(run.run_id);
  const workflow = run.version === undefined ? run.workflow : `${run.workflow} v${run.version}`;
  const live = !run.finished_at;
  const started = run.started_at || run.created_at;
  return el(
    "tr",
    { "data-run-id": id, "data-status": run.status },
    el("td", {}, el("a", { href: `/ui/runs/${encodeURIComponent(id)}`, class: "mono" }, id)),
    el("td", {}, workflow ?? "—"),
    el("td", {}, statusBadge(run.status)),
    el("td", { title: started || "" }, formatTime(started)),
    el("td", { class: "num", title: live ? "so far" : "" }, formatSeconds(run.duration_s) + (live && run.duration_s != null ? " …" : "")),
    el("td", { class: "num cost" }, formatCost(run.cost)),
    el("td", { class: "num" }, formatTokens(run.usage)),
    el("td", { class: "run-error", title: run.error || "" }, run.error || ""),
  );
}

async function refresh() {
  clearTimeout(timer);
  const q = query();
  q.set("limit", String(state.limit));
  try {
    const answer = await api(`/runs?${q}`);
    const runs = runsOf(answer);
    state.nextOffset = answer && Number.isInteger(answer.next_offset) ? answer.next_offset : null;
    body.replaceChildren(...runs.map(row));
    document.getElementById("empty").hidden = runs.length > 0;
    document.getElementById("empty").textContent = state.offset ? "No more runs." : "No runs yet.";
    document.getElementById("page-range").textContent = runs.length
      ? `${state.offset + 1}–${state.offset + runs.length}`
      : "";
    prev.disabled = state.offset === 0;
    next.disabled = state.nextOffset === null;
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    showMessage(message, "");
  } catch (error) {
    showMessage(message, `Cannot list runs: ${error.message}`, "error");
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function changeFilters() {
  state.status = statusFilter.value;
  state.workflow = workflowFilter.value.trim();
  state.offset = 0;
  writeQuery();
  refresh();
}

statusFilter.addEventListener("change", changeFilters);
workflowFilter.addEventListener("change", changeFilters);
prev.addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - state.limit);
  writeQuery();
  refresh();
});
next.addEventListener("click", () => {
  if (state.nextOffset === null) return;
  state.offset = state.nextOffset;
  writeQuery();
  refresh();
});
readQuery();
setupTokenForm(refresh);
refresh();

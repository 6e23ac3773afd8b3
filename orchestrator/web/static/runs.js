// The runs list: GET /runs with the filters, redrawn every few seconds.
import { api, el, formatTime, setupTokenForm, showMessage, statusBadge } from "./common.js";

const REFRESH_MS = 2000;
const body = document.querySelector("#runs tbody");
const message = document.getElementById("message");
const statusFilter = document.getElementById("filter-status");
const workflowFilter = document.getElementById("filter-workflow");
let timer = null;

// GET /runs answers {"runs": [summary, ...]} (a bare list is accepted too).
function runsOf(answer) {
  if (Array.isArray(answer)) return answer;
  return answer && Array.isArray(answer.runs) ? answer.runs : [];
}

function row(run) {
  const id = String(run.run_id);
  const workflow = run.version === undefined ? run.workflow : `${run.workflow} v${run.version}`;
  return el(
    "tr",
    { "data-run-id": id },
    el("td", {}, el("a", { href: `/ui/runs/${encodeURIComponent(id)}`, class: "mono" }, id)),
    el("td", {}, workflow ?? "—"),
    el("td", {}, statusBadge(run.status)),
    el("td", { title: run.created_at || "" }, formatTime(run.created_at)),
    el("td", { title: run.finished_at || "" }, formatTime(run.finished_at)),
  );
}

async function refresh() {
  clearTimeout(timer);
  const query = new URLSearchParams();
  if (statusFilter.value) query.set("status", statusFilter.value);
  if (workflowFilter.value.trim()) query.set("workflow", workflowFilter.value.trim());
  try {
    const runs = runsOf(await api(`/runs${query.size ? `?${query}` : ""}`));
    runs.sort((a, b) => String(b.created_at || "").localeCompare(String(a.created_at || "")));
    body.replaceChildren(...runs.map(row));
    document.getElementById("empty").hidden = runs.length > 0;
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    showMessage(message, "");
  } catch (error) {
    showMessage(message, `Cannot list runs: ${error.message}`, "error");
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

statusFilter.addEventListener("change", refresh);
workflowFilter.addEventListener("change", refresh);
setupTokenForm(refresh);
refresh();

// Shared by both pages: the API token, fetch with auth, building DOM nodes without innerHTML, formatting.

const TOKEN_KEY = "orchestrator.token";

export const FINISHED_RUN = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
export const FINISHED_STEP = new Set(["succeeded", "failed", "skipped", "upstream_failed", "cancelled"]);

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The human message in an API answer: {"message"}, FastAPI's {"detail"} (a string or validation errors), or text.
export function messageOf(body) {
  if (body === null || body === undefined) return "";
  if (typeof body === "string") return body;
  if (typeof body.message === "string") return body.message;
  const detail = body.detail;
  if (typeof detail === "string") return detail;
  if (detail && typeof detail.message === "string") return detail.message;
  if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  if (typeof body.error === "string") return body.error;
  if (body.error && typeof body.error.message === "string") return body.error.message;
  return "";
}

// Calls the API on this origin with the token, if any; JSON in, JSON out; a non-2xx answer throws ApiError.
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: keep the text as the message.
  }
  if (!response.ok) {
    let message = messageOf(parsed) || `${response.status} ${response.statusText}`;
    // A 403 with a token set is about that token's principal (a scope, not an approver): no hint then.
    if (response.status === 401 || (response.status === 403 && !token())) message += " (enter an API token above)";
    throw new ApiError(response.status, message);
  }
  return parsed;
}

// document.createElement with attributes, listeners ("onclick") and children; strings become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

// A status word as a CSS class suffix; anything unexpected gets the neutral style.
export function statusClass(status) {
  return `st-${/^[a-z_]+$/.test(status || "") ? status : "unknown"}`;
}

export function statusBadge(status) {
  return el("span", { class: `badge ${statusClass(status)}` }, (status || "unknown").replace("_", " "));
}

// An ISO 8601 time, or epoch seconds (a number or a numeric string, as in approval audit entries).
export function formatTime(iso) {
  if (iso === null || iso === undefined || iso === "") return "—";
  const date = /^\d+(\.\d+)?$/.test(String(iso)) ? new Date(Number(iso) * 1000) : new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

export function formatDuration(startIso, endIso) {
  if (!startIso) return "—";
  const ms = (endIso ? new Date(endIso) : new Date()) - new Date(startIso);
  if (!(ms >= 0)) return "—";
  return ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
}

export function showMessage(node, text, kind = "info") {
  node.textContent = text;
  node.className = `message ${kind}`;
  node.hidden = !text;
}

// Wires the header's token form; onChange runs after the token is saved or cleared.
export function setupTokenForm(onChange) {
  const form = document.getElementById("token-form");
  const input = form.querySelector("input");
  const state = form.querySelector(".token-state");
  const refresh = () => {
    state.textContent = token() ? "token set" : "no token";
    input.value = "";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    refresh();
    onChange();
  });
  form.querySelector("button[type=reset]").addEventListener("click", (event) => {
    event.preventDefault();
    setToken("");
    refresh();
    onChange();
  });
  refresh();
}

// US dollars: cents from $1, four decimals from 1 ¢, six below (LLM calls cost fractions of a cent).
export function formatUsd(value) {
  const usd = Number(value);
  if (!Number.isFinite(usd)) return "—";
  const digits = Math.abs(usd) >= 1 ? 2 : Math.abs(usd) >= 0.01 ? 4 : 6;
  return `${usd < 0 ? "−" : ""}$${Math.abs(usd).toFixed(digits)}`;
}

// A count with thousands separators, the same in every locale (1,234).
export function formatCount(value) {
  return Number(value || 0).toLocaleString("en-US");
}

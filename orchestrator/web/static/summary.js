// The run page's figures: the progress bar by outcome; cost, tokens, budget left and duration, per run and per step.
import { FINISHED_STEP, el, formatCount, formatDuration, formatUsd, statusClass } from "./common.js";

// Outcomes first, then what is still going on; a status not listed here goes last.
const ORDER = [
  "succeeded", "failed", "upstream_failed", "skipped", "cancelled", "running", "waiting", "queued", "pending",
];

const words = (status) => status.replace("_", " ");
const tokens = (usage) => `${formatCount(usage.input_tokens)} in / ${formatCount(usage.output_tokens)} out`;

// A segment per status, as wide as its share of the steps, and the counts in words ("4 succeeded, 1 failed").
export function renderProgress(bar, text, steps) {
  const counts = new Map();
  for (const { status } of steps) counts.set(status, (counts.get(status) || 0) + 1);
  const present = [...ORDER, ...[...counts.keys()].filter((s) => !ORDER.includes(s))].filter((s) => counts.get(s));
  bar.replaceChildren(
    ...present.map((status) => {
      const segment = el("span", { class: `segment ${statusClass(status)}`, "data-status": status,
        "data-count": counts.get(status), title: `${counts.get(status)} ${words(status)}` });
      segment.style.flexGrow = String(counts.get(status)); // CSSOM: allowed under style-src 'self'
      return segment;
    }),
  );
  const done = steps.filter((s) => FINISHED_STEP.has(s.status)).length;
  text.textContent = present.map((s) => `${counts.get(s)} ${words(s)}`).join(", ") || "no steps";
  bar.title = `${done} of ${steps.length} steps finished`;
  bar.setAttribute("aria-label", `${text.textContent} (${bar.title})`);
}

function show(node, text, data = {}) {
  node.textContent = text;
  node.hidden = !text;
  for (const [key, value] of Object.entries(data)) node.dataset[key] = String(value);
}

// The run's cost (what the provider billed), tokens in and out, budget left and duration, each hidden when the run
// has none. `nodes` holds the elements: {cost, tokens, budget, duration}. Raw figures go in data-* attributes.
export function renderRunFacts(nodes, view) {
  const cost = Number(view.cost ?? 0);
  show(nodes.cost, view.cost === undefined ? "" : `Cost ${formatUsd(cost)}`, { usd: cost });
  const usage = view.usage;
  const counts = usage ? { input: usage.input_tokens, output: usage.output_tokens } : {};
  show(nodes.tokens, usage ? `Tokens ${tokens(usage)}` : "", counts);
  const budget = view.budget;
  if (budget) {
    const left = budget.budget_usd - cost;
    const held = budget.held_usd > 0 ? `, ${formatUsd(budget.held_usd)} held` : "";
    const exhausted = budget.exhausted ? ", exhausted" : "";
    show(nodes.budget, `Budget left ${formatUsd(left)} of ${formatUsd(budget.budget_usd)}${held}${exhausted}`,
      { usd: left });
    nodes.budget.classList.toggle("over", left <= 0 || budget.exhausted);
  } else {
    show(nodes.budget, "");
  }
  const started = view.started_at || view.created_at;
  const ended = view.finished_at || view.stopped_at;
  show(nodes.duration, started ? `Duration ${formatDuration(started, ended)}` : "");
}

// One line about a step: its duration (first start to finish, ticking while it runs), cost and tokens.
export function stepFacts(step) {
  const parts = [];
  if (step.items) parts.push(`${itemsDone(step.items)}/${formatCount(step.items.total)} items`);
  if (step.started_at) parts.push(formatDuration(step.started_at, step.finished_at));
  if (step.cost !== undefined) parts.push(formatUsd(step.cost));
  if (step.usage) parts.push(`${formatCount((step.usage.input_tokens || 0) + (step.usage.output_tokens || 0))} tok`);
  return parts.join(" · ");
}

// A map step's items that have ended, of its total.
export function itemsDone(items) {
  return formatCount(items.succeeded + items.failed + items.skipped + items.cancelled);
}

// The side panel's rows for a step's cost and tokens, when it has them.
export function stepMoneyFacts(step) {
  const facts = [];
  if (step.cost !== undefined) facts.push(["Cost", formatUsd(step.cost)]);
  if (step.usage) {
    facts.push(["Tokens", tokens(step.usage)]);
  }
  if (step.deferrals) facts.push(["Deferrals", String(step.deferrals)]);
  return facts;
}
